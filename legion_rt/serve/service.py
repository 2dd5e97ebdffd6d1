"""The service core, independent of the web framework: state (loading, ready, draining), admission, the worker
thread that runs one request's ``engine.stream()``, request options, authentication and Prometheus metrics.

``engine.stream()`` is synchronous and blocking; each request runs it on a thread of its own (the whole life of
the generator: the call, which validates, decodes and waits for an admission slot, every ``next()`` and the
``close()``), and hands the events to the event loop through an ``asyncio.Queue``. Cancelling a request sets a
flag that the thread checks after each event: it then closes the generator itself (a generator may only be
closed by the thread running it), so a disconnected client stops its request within one decode step.

Admission (``max_concurrency`` running, ``max_queue`` waiting in FIFO order, ``BusyError`` beyond) and deadlines
(``timeout_s``, ``DeadlineError``) belong to ``Engine`` (legion_rt/admission.py, legion_rt/request.py); the
service passes its limits to the Engine and maps the errors to 429 / 504.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BusyError, DeadlineError, ImageError, LegionError, RequestError

log = logging.getLogger("legion_rt.serve")

DEMO_PICTURE = Path(__file__).resolve().parents[1] / "assets" / "demo.jpg"


@dataclass
class ServeConfig:
    """Every option of ``legion-rt serve`` (each also from a ``LEGION_RT_*`` environment variable)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_concurrency: int = 1  # requests decoding at once
    max_queue: int = 8  # requests waiting for a slot (FIFO); one more is a 429
    timeout: float = (
        120.0  # seconds per request, queueing included; 0 = none. A client's timeout_s may lower it
    )
    max_new_tokens_limit: int = 512  # a request asking for more is a 422
    max_body_bytes: int = 64 * 1024 * 1024  # 413 over it
    api_key_file: str | None = None  # Bearer keys, one a line; None = no authentication
    drain_timeout: float = 30.0  # seconds SIGTERM waits for requests in flight
    read_timeout: float = 60.0  # seconds to receive a request's body (408 after)
    keepalive: float = 2.0  # seconds between SSE keep-alive comments while nothing else is sent
    warmup: bool = True  # ready only after a request on the bundled picture has passed
    ray: bool = False
    replicas: int = 1
    api_keys: list[bytes] = field(default_factory=list, repr=False)

    def load_keys(self) -> None:
        if not self.api_key_file:
            return
        try:
            text = Path(self.api_key_file).read_text(encoding="utf-8")
        except OSError as e:
            raise LegionError(
                f"--api-key-file {self.api_key_file}: cannot read ({e.strerror or e})"
            ) from None
        self.api_keys = [ln.strip().encode("utf-8") for ln in text.splitlines() if ln.strip()]
        if not self.api_keys:
            raise LegionError(f"--api-key-file {self.api_key_file}: holds no key")


def model_identity(engine) -> dict[str, str]:
    """``{"name", "manifest_sha256"}`` of the model an Engine serves (what ``Result.model`` holds)."""
    art = engine.art
    manifest = Path(art.root) / "manifest.json"
    return {
        "name": str(art.model.get("name") or Path(art.root).name),
        "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
    }


# ------------------------------------------------------------------------------------------- admission
# --------------------------------------------------------------------------------------------- options
_INT_OPTS = ("max_new_tokens", "seed")
_FLOAT_OPTS = ("temperature", "top_p", "skip_if_real", "timeout_s")
_BOOL_OPTS = ("stream",)
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


@dataclass
class RequestOptions:
    engine: dict[str, Any]
    timeout_s: float | None
    stream: bool
    masks_png: bool


def parse_options(items: list[tuple[str, str]], config: ServeConfig) -> RequestOptions:
    """Query items -> RequestOptions. Raises RequestError (HTTP 422) naming the bad value."""
    q = dict(items)
    unknown = set(q) - set(_INT_OPTS) - set(_FLOAT_OPTS) - set(_BOOL_OPTS) - {"masks"}
    if unknown:
        raise RequestError(f"unknown option(s): {', '.join(sorted(unknown))}")
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
                v = float(q[k])
            except ValueError:
                raise RequestError(f"{k}={q[k]!r}: not a number") from None
            if not math.isfinite(v):
                raise RequestError(f"{k}={q[k]!r}: must be a finite number")
            opts[k] = v
    stream = False
    if "stream" in q:
        s = q["stream"].strip().lower()
        if s not in _TRUE + _FALSE:
            raise RequestError(f"stream={q['stream']!r}: must be true or false")
        stream = s in _TRUE
    if q.get("masks", "") not in ("", "png"):
        raise RequestError(f"masks={q['masks']!r}: the only value is png (masks are always in mask_rle)")
    limit = config.max_new_tokens_limit
    n = opts.setdefault("max_new_tokens", min(512, limit))
    if n > limit:
        raise RequestError(
            f"max_new_tokens={n}: over this server's limit of {limit} (--max-new-tokens-limit)"
        )
    timeout_s = opts.pop("timeout_s", None)
    if timeout_s is not None and timeout_s <= 0:
        raise RequestError(f"timeout_s={timeout_s:g}: must be > 0")
    if config.timeout and config.timeout > 0:
        timeout_s = config.timeout if timeout_s is None else min(timeout_s, config.timeout)
    return RequestOptions(opts, timeout_s, stream, q.get("masks") == "png")


def check_bearer(header: str | None, keys: list[bytes]) -> bool:
    """``Authorization: Bearer <key>`` against the keys, in constant time (every key is compared)."""
    if not keys:
        return True
    scheme, _, token = (header or "").partition(" ")
    given = token.strip().encode("utf-8")
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(given, k)
    return ok and scheme.lower() == "bearer"


# --------------------------------------------------------------------------------------------- metrics
class Metrics:
    OUTCOMES = (
        "ok",
        "bad_request",
        "too_large",
        "invalid",
        "rejected",
        "deadline",
        "unavailable",
        "unauthorized",
        "cancelled",
        "read_timeout",
        "error",
    )

    def __init__(self, service: Service):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        buckets = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
        self.requests = Counter(
            "legion_requests", "Analyze requests by outcome", ["outcome"], registry=r
        )  # exposed as legion_requests_total
        for o in self.OUTCOMES:
            self.requests.labels(o)
        self.seconds = Histogram(
            "legion_request_seconds", "Admitted requests: arrival to last byte", buckets=buckets, registry=r
        )
        self.first_token = Histogram(
            "legion_first_token_seconds", "Arrival to the first generated token", buckets=buckets, registry=r
        )
        self.first_mask = Histogram(
            "legion_first_mask_seconds", "Arrival to the first mask", buckets=buckets, registry=r
        )
        self.rejected = Counter(
            "legion_rejected_requests", "Requests refused with 429 (queue full)", registry=r
        )
        self.gated = Counter(
            "legion_gated_skips", "Requests the detect-first gate answered with the verdict only", registry=r
        )
        self.tokens = Counter("legion_generated_tokens", "Tokens generated", registry=r)
        Gauge("legion_inflight_requests", "Requests running in the engine", registry=r).set_function(
            service.running
        )
        Gauge("legion_queued_requests", "Requests waiting for an engine slot", registry=r).set_function(
            service.queued
        )
        Gauge("legion_ready", "1 when /health/ready answers 200", registry=r).set_function(
            lambda: float(service.state == "ready")
        )

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# --------------------------------------------------------------------------------------------- service
class Service:
    """One engine behind the HTTP routes. ``state``: loading -> warming -> ready -> draining (or failed).

    ``engine``: an Engine (or anything with its interface); ``loader``: a callable returning one, run in the
    background by ``start()`` so the port answers /health/live (and 503 on ready) while the model loads."""

    def __init__(self, config: ServeConfig, engine=None, loader=None):
        if (engine is None) == (loader is None):
            raise ValueError("give an engine or a loader")
        self.config = config
        self.engine = None
        self._raw_engine = engine
        self._loader = loader
        self.state = "loading"
        self.error: str | None = None
        self.identity: dict[str, str] = {}
        self.on_fatal = None  # called with the message when loading or the warm-up fails
        self._lock = threading.Lock()
        self.active = 0  # requests between admission check and the end of their response
        self.jobs = 0  # worker threads alive
        self.started_at = time.monotonic()
        self._seconds_sum, self._seconds_count = 0.0, 0
        self.metrics = Metrics(self)

    # ---- state
    def start(self) -> None:
        """Load (when given a loader), then warm up; blocking (call it from a thread)."""
        try:
            eng = self._raw_engine if self._raw_engine is not None else self._loader()
            self.engine = eng
            try:
                self.identity = model_identity(eng)
            except Exception:  # an engine without an artifact directory (a test double)
                self.identity = {}
            if self.config.warmup:
                self.state = "warming"
                t0 = time.perf_counter()
                gen = eng.stream(
                    DEMO_PICTURE.read_bytes(),
                    max_new_tokens=min(8, self.config.max_new_tokens_limit),
                    timeout_s=self.config.timeout or None,
                )
                try:
                    for _ in gen:
                        pass
                finally:
                    gen.close()
                log.info("warm-up on %s passed in %.2f s", DEMO_PICTURE.name, time.perf_counter() - t0)
            if self.state != "draining":
                self.state = "ready"
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            self.error = msg
            self.state = "failed"
            log.error("not ready: %s", msg)
            if self.on_fatal is not None:
                self.on_fatal(msg)

    def start_background(self) -> threading.Thread:
        t = threading.Thread(target=self.start, name="legion-start", daemon=True)
        t.start()
        return t

    def not_ready_reason(self) -> str | None:
        return {
            "ready": None,
            "loading": "not ready: loading the model",
            "warming": "not ready: warming up",
            "draining": "draining: the server is shutting down and admits no new request",
            "failed": f"not ready: {self.error}",
        }.get(self.state, f"not ready: {self.state}")

    def drain(self) -> None:
        if self.state != "draining":
            log.info("draining: %d request(s) in flight", self.active)
        self.state = "draining"

    def running(self) -> float:
        e = self.engine
        return float(e.running_requests) if e is not None else 0.0

    def queued(self) -> float:
        e = self.engine
        return float(e.queued_requests) if e is not None else 0.0

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the queue ahead of it at the mean request time, in [1, 60]."""
        mean = self._seconds_sum / self._seconds_count if self._seconds_count else 1.0
        waiting = self.queued() + 1
        return int(min(60, max(1, math.ceil(mean * waiting / max(1, self.config.max_concurrency)))))

    def observe_seconds(self, seconds: float) -> None:
        self.metrics.seconds.observe(seconds)
        with self._lock:
            self._seconds_sum += seconds
            self._seconds_count += 1

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    # ---- requests
    def enter(self) -> None:
        with self._lock:
            self.active += 1

    def leave(self) -> None:
        with self._lock:
            self.active -= 1

    def thread_budget_left(self) -> bool:
        """Worker threads are bounded: beyond running + queue (+ slack for threads finishing) it is a 429."""
        c = self.config
        return self.jobs < c.max_concurrency * 2 + c.max_queue

    def submit(self, image: bytes, opts: RequestOptions) -> Job:
        job = Job(self, asyncio.get_running_loop(), image, opts)
        with self._lock:
            self.jobs += 1
        job.start()
        return job

    def _job_done(self) -> None:
        with self._lock:
            self.jobs -= 1


class Job:
    """One request on its own thread. Messages to the event loop: ("admitted", None) | ("failed", exc) first,
    then ("event", ev)* and ("error", exc)?, and always ("end", cancelled: bool) last."""

    def __init__(self, service: Service, loop: asyncio.AbstractEventLoop, image: bytes, opts: RequestOptions):
        self.service, self.loop, self.image, self.opts = service, loop, image, opts
        self.queue: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()
        self.thread = threading.Thread(target=self._run, name="legion-request", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _put(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed (process exit): nobody listens any more
            pass

    def _run(self) -> None:
        gen = None
        try:
            try:
                gen = self.service.engine.stream(
                    self.image, timeout_s=self.opts.timeout_s, **self.opts.engine
                )
            except BaseException as e:
                self._put("failed", e)
                return
            self._put("admitted", None)
            try:
                it = iter(gen)
                while not self._cancel.is_set():
                    try:
                        ev = next(it)
                    except StopIteration:
                        break
                    self._put("event", ev)
            except BaseException as e:
                self._put("error", e)
        finally:
            if gen is not None:
                try:
                    gen.close()  # from the thread that iterated it: stops decoding, frees the KV and the slot
                except Exception as e:  # pragma: no cover - closing must not kill the thread
                    log.warning("closing a request's generator failed: %s", e)
                self._put("end", self._cancel.is_set())
            self.service._job_done()


def status_of(exc: BaseException) -> tuple[int, str, str]:
    """An exception raised by a request -> (HTTP status, outcome label, one-line message)."""
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, BusyError):
        return 429, "rejected", msg
    if isinstance(exc, DeadlineError):
        return 504, "deadline", msg
    if isinstance(exc, ImageError):
        return 400, "bad_request", msg
    if isinstance(exc, RequestError):
        return 422, "invalid", msg
    if isinstance(exc, LegionError):
        return 500, "error", msg
    log.error("unexpected %s in a request: %s", type(exc).__name__, msg)
    return 500, "error", f"internal error ({type(exc).__name__})"
