"""uvicorn for ``legion-rt serve``: the listening socket, and SIGTERM / SIGINT as a drain.

On the first signal /health/ready turns 503 and new analyze requests get 503 (the port stays open, so a load
balancer sees the 503); requests in flight finish, for up to ``drain_timeout`` seconds; then uvicorn stops (what
is still running after the drain timeout is cancelled) and the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import logging
import socket
import time

import uvicorn

from ..errors import LegionError
from .service import ServeConfig, Service

log = logging.getLogger("legion_rt.serve")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one). Raises LegionError naming the address."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        raise LegionError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service
        self.drain_started: float | None = None

    def handle_exit(self, sig, frame) -> None:  # the signal handler (main thread)
        if self.drain_started is not None or self.service.state not in ("ready", "warming"):
            if self.drain_started is not None:
                log.warning("second signal: exiting now")
                self.force_exit = True
            self.should_exit = True
            return
        self.drain_started = time.monotonic()
        self.service.drain()

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and not self.should_exit:
            waited = time.monotonic() - self.drain_started
            if self.service.active == 0:
                log.info("drained in %.2f s: exiting", waited)
                self.should_exit = True
            elif waited >= self.service.config.drain_timeout:
                log.warning(
                    "drain timeout (%g s): %d request(s) still in flight are cancelled",
                    self.service.config.drain_timeout,
                    self.service.active,
                )
                self.config.timeout_graceful_shutdown = 0.5
                self.should_exit = True
        return await super().on_tick(counter)


def serve_app(app, service: Service, config: ServeConfig, *, sock: socket.socket | None = None, **uvicorn_kw):
    """Run ``app`` on ``sock`` (bound to config.host:config.port when None) until drained. Returns the uvicorn
    Server (``service.state`` tells whether it failed to start)."""
    sock = sock or bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    ucfg = uvicorn.Config(
        app,
        lifespan="on",
        timeout_graceful_shutdown=max(1, int(config.drain_timeout)),
        timeout_keep_alive=5,
        **uvicorn_kw,
    )
    server = DrainingServer(ucfg, service)

    def fatal(msg: str) -> None:
        server.should_exit = True

    service.on_fatal = fatal
    log.info("listening on http://%s:%d (POST /v1/analyze, GET /health/ready, /metrics, /docs)", host, port)
    server.run(sockets=[sock])
    return server
