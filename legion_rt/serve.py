"""``legion-rt serve``: a small HTTP service over one ``Engine`` (Python standard library only).

Endpoints (JSON in UTF-8):

``GET /health``
    ``{"status": "ok", "backend": ..., "providers": [...], "model": {...}}``
``POST /analyze`` (body: the encoded picture, any format ``load_image`` reads)
    Query options: ``max_new_tokens``, ``temperature``, ``top_p``, ``seed``, ``skip_if_real``, ``masks=png``
    (adds each mask and the union as base64 PNG). Returns ``Result.to_dict()`` (+ masks).
``POST /analyze?stream=1``
    Newline-delimited JSON, one line per event as it happens: ``{"event": "token", "token_id", "text"}``,
    ``{"event": "mask", "artifact": {...}}``, then ``{"event": "done", "result": {...}}``.

Errors: a bad picture -> 400, a bad option -> 422, a body over ``max_body_bytes`` -> 413, each as
``{"error": "<one line>"}``. Requests are served by a thread each; one Engine serves them all (it is thread-safe).
This is the minimal service of the CLI contract; a production server (auth, batching, metrics) is future work.
"""

from __future__ import annotations

import base64
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from .errors import ImageError, LegionError, RequestError

MAX_BODY_BYTES = 64 * 1024 * 1024
READ_TIMEOUT_S = 60.0

_INT_OPTS = ("max_new_tokens", "seed")
_FLOAT_OPTS = ("temperature", "top_p", "skip_if_real")


def parse_options(query: str) -> tuple[dict[str, Any], bool, bool]:
    """Query string -> (engine options, stream?, masks as PNG?). Raises RequestError naming the bad value."""
    q = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    opts: dict[str, Any] = {}
    for k in _INT_OPTS:
        if k in q:
            try:
                opts[k] = int(q[k])
            except ValueError:
                raise RequestError(f"{k}={q[k]!r}: not an integer") from None
    for k in _FLOAT_OPTS:
        if k in q:
            try:
                opts[k] = float(q[k])
            except ValueError:
                raise RequestError(f"{k}={q[k]!r}: not a number") from None
    unknown = set(q) - set(_INT_OPTS) - set(_FLOAT_OPTS) - {"stream", "masks"}
    if unknown:
        raise RequestError(f"unknown option(s): {', '.join(sorted(unknown))}")
    stream = q.get("stream", "0") not in ("0", "", "false")
    masks = q.get("masks", "") == "png"
    return opts, stream, masks


def _png_b64(mask) -> str:
    from .overlay import png_bytes

    return base64.b64encode(png_bytes(mask.astype("uint8") * 255)).decode("ascii")


def make_handler(engine, *, max_body_bytes: int = MAX_BODY_BYTES, read_timeout_s: float = READ_TIMEOUT_S):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "legion-rt"
        # Socket timeout (StreamRequestHandler applies it): a client that stalls mid-request, e.g. sends fewer
        # body bytes than its Content-Length, would otherwise hold a server thread forever.
        timeout = read_timeout_s

        def log_message(self, fmt, *args):  # one line per request on stderr
            sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

        def _json(self, status: int, obj: Any) -> None:
            data = (json.dumps(obj) + "\n").encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 (http.server naming)
            if urlparse(self.path).path != "/health":
                return self._json(404, {"error": f"no such endpoint: {self.path}"})
            m = engine.manifest.model
            self._json(
                200,
                {
                    "status": "ok",
                    "backend": engine.backend_name,
                    "providers": engine.providers,
                    "model": {k: getattr(m, k) for k in ("name", "hidden_size", "num_layers", "vocab_size")},
                    "detector": engine.has_detector,
                },
            )

        def do_POST(self):  # noqa: N802
            url = urlparse(self.path)
            if url.path != "/analyze":
                return self._json(404, {"error": f"no such endpoint: {url.path}"})
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                return self._json(400, {"error": "bad Content-Length"})
            if length <= 0:
                return self._json(400, {"error": "empty body: POST the picture's bytes"})
            if length > max_body_bytes:
                return self._json(
                    413, {"error": f"body of {length} bytes is over the limit of {max_body_bytes}"}
                )
            try:
                body = self.rfile.read(length)
            except TimeoutError:
                self.close_connection = True
                return self._json(408, {"error": f"body not received within {read_timeout_s:g} s"})
            if len(body) != length:  # the client closed early
                self.close_connection = True
                return self._json(400, {"error": f"body ended after {len(body)} of {length} bytes"})
            try:
                opts, stream, masks = parse_options(url.query)
                events = engine.stream(body, **opts)  # decodes and validates now: errors before any output
            except ImageError as e:
                return self._json(400, {"error": str(e)})
            except RequestError as e:
                return self._json(422, {"error": str(e)})
            except LegionError as e:
                return self._json(500, {"error": str(e)})
            if stream:
                return self._stream(events, masks)
            result = None
            try:
                for ev in events:
                    if type(ev).__name__ == "DoneEvent":
                        result = ev.result
            except LegionError as e:
                return self._json(500, {"error": str(e)})
            self._json(200, self._result_doc(result, masks))

        @staticmethod
        def _result_doc(result, masks: bool) -> dict:
            doc = result.to_dict()
            if masks:
                doc["mask_png"] = _png_b64(result.mask)
                for a, d in zip(result.artifacts, doc["artifacts"], strict=True):
                    d["mask_png"] = _png_b64(a.mask)
            return doc

        def _stream(self, events, masks: bool) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def send(obj):
                data = (json.dumps(obj) + "\n").encode("utf-8")
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            try:
                for ev in events:
                    kind = type(ev).__name__
                    if kind == "TokenEvent":
                        send({"event": "token", "token_id": ev.token_id, "text": ev.text})
                    elif kind == "MaskEvent":
                        d = ev.artifact.to_dict()
                        if masks:
                            d["mask_png"] = _png_b64(ev.artifact.mask)
                        send({"event": "mask", "artifact": d})
                    else:
                        send({"event": "done", "result": self._result_doc(ev.result, masks)})
            except LegionError as e:
                send({"event": "error", "error": str(e)})
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    return Handler


def make_server(engine, host: str = "127.0.0.1", port: int = 8000, **kw) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), make_handler(engine, **kw))
    server.daemon_threads = True
    return server


def main(args) -> int:
    """``legion-rt serve --artifacts ART [--host 127.0.0.1] [--port 8000]``."""
    from .cli import engine_from_args

    engine = engine_from_args(args)
    try:
        server = make_server(engine, args.host, args.port)
    except OSError as e:
        raise LegionError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e})") from None
    host, port = server.server_address[:2]
    print(f"legion-rt serving {args.artifacts} on http://{host}:{port} ({engine.backend_name}, "
          f"{', '.join(engine.providers)}); POST /analyze, GET /health", file=sys.stderr, flush=True)  # fmt: skip
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.close()
    return 0
