"""The FastAPI application: routes, status codes, streaming (SSE / NDJSON), authentication and metrics.

Built by ``create_app(service)``; run by uvicorn (``legion_rt.serve.runner``) or Ray Serve
(``legion_rt.serve.ray_app``): the same routes and JSON either way.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import RequestError
from .service import Job, Service, check_bearer, parse_options, status_of

log = logging.getLogger("legion_rt.serve")

_OPTION_DOCS = [
    ("max_new_tokens", "integer", "tokens to generate at most (default min(512, --max-new-tokens-limit))"),
    ("temperature", "number", "0 = greedy (default); > 0 samples"),
    ("top_p", "number", "nucleus sampling threshold (with temperature > 0)"),
    ("seed", "integer", "sampling seed"),
    ("skip_if_real", "number", "detect-first gate: verdict only when P(real) >= this"),
    ("timeout_s", "number", "deadline in seconds, queueing included (capped by --timeout); 504 past it"),
    ("stream", "boolean", "Server-Sent Events (token, mask, done, error) instead of one JSON document"),
    ("masks", "string", "png: also each mask and the union as base64 PNG (mask_png)"),
]
_ANALYZE_OPENAPI = {
    "parameters": [
        {"name": n, "in": "query", "required": False, "schema": {"type": t}, "description": d}
        for n, t, d in _OPTION_DOCS
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
        },
    },
    "responses": {
        "200": {
            "description": "The Result JSON (legion_rt/schemas/result.schema.json); text/event-stream or "
            "application/x-ndjson when streaming"
        },
        **{
            str(code): {"description": what, "content": {"application/json": {"example": {"error": "..."}}}}
            for code, what in [
                (400, "bad picture"),
                (401, "missing or wrong Bearer key"),
                (408, "body not received in time"),
                (413, "body over --max-body-bytes"),
                (422, "bad option"),
                (429, "queue full (Retry-After)"),
                (503, "not ready or draining"),
                (504, "deadline passed"),
            ]
        },
    },
}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _Disconnected(Exception):
    pass


class _BodyError(Exception):
    def __init__(self, status: int, outcome: str, message: str):
        super().__init__(message)
        self.status, self.outcome = status, outcome


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request's body, refusing more than ``limit`` bytes (413) and a body slower than ``timeout`` (408)."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise _BodyError(400, "bad_request", "bad Content-Length") from None
        if n > limit:
            raise _BodyError(413, "too_large", f"body of {n} bytes is over the limit of {limit}")
    chunks, size = [], 0
    try:
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _BodyError(413, "too_large", f"body over the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise _BodyError(408, "read_timeout", f"body not received within {timeout:g} s") from None
    return b"".join(chunks)


async def _picture(request: Request, body: bytes, limit: int) -> bytes:
    """The picture: the raw body, or the multipart field ``file``."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=4, max_fields=32, max_part_size=limit)
        except Exception as e:  # python-multipart's errors
            raise _BodyError(
                400, "bad_request", f"bad multipart body ({(str(e) or type(e).__name__).splitlines()[0]})"
            ) from None
        f = form.get("file")
        if f is None or isinstance(f, str):
            raise _BodyError(400, "bad_request", "multipart body without a file field named 'file'")
        data = await f.read()
        await form.close()
        body = data
    if not body:
        raise _BodyError(
            400, "bad_request", "empty body: POST the picture's bytes (or a multipart field 'file')"
        )
    return body


async def _wait_disconnect(receive) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


class _Pump:
    """Reads a Job's messages while watching the client's connection."""

    def __init__(self, job: Job, receive):
        self.job = job
        self._disc = asyncio.ensure_future(_wait_disconnect(receive))

    async def get(self, timeout: float | None = None):
        """The next message, None after ``timeout`` seconds; raises _Disconnected when the client went away."""
        getter = asyncio.ensure_future(self.job.queue.get())
        try:
            done, _ = await asyncio.wait(
                {getter, self._disc}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            getter.cancel()
            raise
        if getter in done:
            return getter.result()
        getter.cancel()
        if self._disc in done:
            raise _Disconnected
        return None

    def close(self) -> None:
        self._disc.cancel()


def _png_b64(mask) -> str:
    from ..overlay import png_bytes

    return base64.b64encode(png_bytes(mask.astype("uint8") * 255)).decode("ascii")


class _Request:
    """One analyze request's bookkeeping: timings for the metrics, the outcome, the log line."""

    def __init__(self, service: Service, opts, t0: float):
        self.service, self.opts, self.t0 = service, opts, t0
        self.first_token = self.first_mask = None
        self.tokens = 0

    def seen(self, ev) -> None:
        kind = type(ev).__name__
        now = time.perf_counter() - self.t0
        if kind == "TokenEvent":
            self.tokens += 1
            if self.first_token is None:
                self.first_token = now
                self.service.metrics.first_token.observe(now)
        elif kind == "MaskEvent" and self.first_mask is None:
            self.first_mask = now
            self.service.metrics.first_mask.observe(now)

    def result_doc(self, result) -> dict[str, Any]:
        if not result.model and self.service.identity:
            result.model = dict(self.service.identity)
        doc = result.to_dict()
        if self.opts.masks_png:
            doc["mask_png"] = _png_b64(result.mask)
            for a, d in zip(result.artifacts, doc["artifacts"], strict=True):
                d["mask_png"] = _png_b64(a.mask)
        return doc

    def finish(self, outcome: str, result=None) -> None:
        m = self.service.metrics
        m.requests.labels(outcome).inc()
        m.tokens.inc(self.tokens)
        if result is not None and result.skipped:
            m.gated.inc()
        if outcome in ("ok", "deadline", "cancelled", "error"):
            self.service.observe_seconds(time.perf_counter() - self.t0)


def _frame_sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _frame_ndjson(event: str, data: dict) -> bytes:
    if event == "done":
        obj = {"event": "done", "result": data}
    elif event == "mask":
        obj = {"event": "mask", "artifact": data}
    else:
        obj = {"event": event, **data}
    return (json.dumps(obj) + "\n").encode()


class _EventStream(Response):
    """A streamed answer: SSE (``fmt="sse"``) or NDJSON. Keep-alive comments (SSE) while nothing else is sent;
    a client that goes away cancels the request."""

    def __init__(self, req: _Request, pump: _Pump, fmt: str):
        super().__init__(
            status_code=200,
            media_type="text/event-stream" if fmt == "sse" else "application/x-ndjson",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        # Response.__init__ sets Content-Length: 0 for its empty body; a stream has none.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.req, self.pump, self.fmt = req, pump, fmt

    async def __call__(self, scope, receive, send) -> None:
        req, pump, service = self.req, self.pump, self.req.service
        frame = _frame_sse if self.fmt == "sse" else _frame_ndjson
        outcome, result = "error", None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

            async def out(data: bytes) -> None:
                await send({"type": "http.response.body", "body": data, "more_body": True})

            while True:
                try:
                    msg = await pump.get(service.config.keepalive if self.fmt == "sse" else None)
                except _Disconnected:
                    outcome = "cancelled"
                    _log_cancel(pump.job, req)
                    return
                if msg is None:
                    await out(b": keep-alive\n\n")
                    continue
                kind, value = msg
                if kind == "event":
                    req.seen(value)
                    name = type(value).__name__
                    if name == "TokenEvent":
                        await out(frame("token", {"token_id": value.token_id, "text": value.text}))
                    elif name == "MaskEvent":
                        d = value.artifact.to_dict()
                        if req.opts.masks_png:
                            d["mask_png"] = _png_b64(value.artifact.mask)
                        await out(frame("mask", d))
                    else:
                        result = value.result
                        await out(frame("done", req.result_doc(result)))
                        outcome = "ok"
                elif kind == "error":
                    _, outcome, message = status_of(value)
                    await out(frame("error", {"error": message}))
                elif kind == "end":
                    break
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:  # the server is stopping (drain timeout): stop the request too
            outcome = "cancelled"
            log.info("shutdown: a streamed request was cut after %d token(s)", req.tokens)
        finally:
            pump.job.cancel()
            pump.close()
            req.finish(outcome, result)
            service.leave()


def _log_cancel(job: Job, req: _Request) -> None:
    log.info(
        "client disconnected after %.2f s and %d token(s): request cancelled",
        time.perf_counter() - req.t0,
        req.tokens,
    )


def _wants(request: Request, opts) -> str:
    accept = request.headers.get("accept", "")
    if "application/x-ndjson" in accept:
        return "ndjson" if opts.stream or "text/event-stream" not in accept else "sse"
    if opts.stream or "text/event-stream" in accept:
        return "sse"
    return "json"


def create_app(service: Service, *, start: str = "background") -> FastAPI:
    """The application over ``service``. ``start``: "background" (the lifespan starts loading and warm-up in a
    thread and the port answers at once: /health/live 200, /health/ready 503 until warm), "blocking" (the
    lifespan returns once ready: Ray Serve replicas) or "none" (the caller starts the service)."""

    @asynccontextmanager
    async def lifespan(app):
        if start == "background":
            service.start_background()
        elif start == "blocking":
            await asyncio.to_thread(service.start)
            if service.state == "failed":
                raise RuntimeError(f"legion_rt service failed to start: {service.error}")
        try:
            yield
        finally:
            await asyncio.to_thread(service.close)

    app = FastAPI(
        title="legion_rt",
        version=__version__,
        summary="LEGION: is a picture AI-generated, where are its artifacts, and why",
        lifespan=lifespan,
    )
    app.state.service = service

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            msg = f"no such endpoint: {request.url.path}"
        return _error(exc.status_code, msg, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request"}
        return _error(422, f"{'.'.join(str(x) for x in first.get('loc', ()))}: {first['msg']}")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.error("unexpected %s: %s", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return _error(500, f"internal error ({type(exc).__name__})")

    @app.get("/health/live", summary="200 while the process runs")
    async def live():
        return {"status": "live"}

    def ready_doc():
        reason = service.not_ready_reason()
        if reason is not None:
            return _error(503, reason, {"Retry-After": "1"})
        eng = service.engine
        return {
            "status": "ok",
            "backend": getattr(eng, "backend_name", None),
            "providers": list(getattr(eng, "providers", []) or []),
            "model": service.identity,
            "detector": bool(getattr(eng, "has_detector", False)),
            "max_concurrency": service.config.max_concurrency,
            "max_queue": service.config.max_queue,
        }

    @app.get("/health/ready", summary="200 once warm; 503 while loading, warming up or draining")
    async def ready():
        return ready_doc()

    @app.get("/health", summary="alias of /health/ready")
    async def health():
        return ready_doc()

    @app.get("/metrics", summary="Prometheus metrics (text exposition format)")
    async def metrics():
        data, ctype = service.metrics.render()
        return Response(data, media_type=ctype)

    async def analyze(request: Request):
        t0 = time.perf_counter()
        m = service.metrics
        keys = service.config.api_keys
        if keys and not check_bearer(request.headers.get("authorization"), keys):
            m.requests.labels("unauthorized").inc()
            return _error(
                401,
                "missing or wrong API key: send Authorization: Bearer <key>",
                {"WWW-Authenticate": "Bearer"},
            )
        reason = service.not_ready_reason()
        if reason is not None:
            m.requests.labels("unavailable").inc()
            return _error(503, reason, {"Retry-After": str(service.retry_after())})
        try:
            opts = parse_options(request.query_params.multi_items(), service.config)
        except RequestError as e:
            m.requests.labels("invalid").inc()
            return _error(422, str(e))
        try:
            body = await _read_body(request, service.config.max_body_bytes, service.config.read_timeout)
            image = await _picture(request, body, service.config.max_body_bytes)
        except _BodyError as e:
            m.requests.labels(e.outcome).inc()
            return _error(e.status, str(e))
        except Exception:  # ClientDisconnect while reading the body
            log.info("client disconnected while sending its body")
            m.requests.labels("cancelled").inc()
            return Response(status_code=499)
        if not service.thread_budget_left():
            m.requests.labels("rejected").inc()
            m.rejected.inc()
            return _error(
                429, "busy: too many requests in flight", {"Retry-After": str(service.retry_after())}
            )
        fmt = _wants(request, opts)
        req = _Request(service, opts, t0)
        service.enter()
        handed_over = False
        try:
            job = service.submit(image, opts)
            pump = _Pump(job, request.receive)
            try:
                first = await pump.get()
            except _Disconnected:
                job.cancel()
                pump.close()
                log.info("client disconnected while its request waited for admission: cancelled")
                req.finish("cancelled")
                return Response(status_code=499)
            kind, value = first
            if kind == "failed":
                pump.close()
                status, outcome, message = status_of(value)
                req.finish(outcome)
                if status == 429:
                    m.rejected.inc()
                    return _error(429, message, {"Retry-After": str(service.retry_after())})
                return _error(status, message)
            if fmt != "json":
                handed_over = True
                return _EventStream(req, pump, fmt)
            # one JSON document
            result, failure = None, None
            try:
                while True:
                    kind, value = await pump.get()
                    if kind == "event":
                        req.seen(value)
                        if type(value).__name__ == "DoneEvent":
                            result = value.result
                    elif kind == "error":
                        failure = value
                    elif kind == "end":
                        break
            except _Disconnected:
                job.cancel()
                _log_cancel(job, req)
                req.finish("cancelled")
                return Response(status_code=499)
            except (
                asyncio.CancelledError
            ):  # the server is stopping (drain timeout): answer 503, stop the request
                job.cancel()
                req.finish("cancelled")
                log.info("shutdown: a request was cut after %d token(s)", req.tokens)
                return _error(503, "the server shut down before the request finished")
            finally:
                pump.close()
            if failure is not None or result is None:
                status, outcome, message = status_of(failure or RuntimeError("no result"))
                req.finish(outcome)
                return _error(status, message)
            doc = req.result_doc(result)
            req.finish("ok", result)
            return JSONResponse(doc)
        finally:
            if not handed_over:
                service.leave()

    app.add_api_route(
        "/v1/analyze",
        analyze,
        methods=["POST"],
        summary="Analyze a picture (raw body or multipart field 'file')",
        openapi_extra=_ANALYZE_OPENAPI,
    )
    app.add_api_route(
        "/analyze", analyze, methods=["POST"], summary="Alias of /v1/analyze", openapi_extra=_ANALYZE_OPENAPI
    )
    return app
