"""The same application on Ray Serve: N replicas, each one ``Service`` + ``create_app`` over its own Engine,
behind Ray's HTTP proxy (same routes, same JSON, same status codes).

From the command line: ``legion-rt serve --ray --replicas 2 --artifacts ART [--max-concurrency 1 ...]`` (starts or
joins Ray: ``RAY_ADDRESS`` selects a cluster). As a Python entry point, for ``serve run`` or a Ray Serve config
file::

    serve run legion_rt.serve.ray_app:build_app artifacts=/models/legion-art replicas=4 max_concurrency=1

or ``serve.run(legion_rt.serve.ray_app.deployment(ART, ServeConfig(replicas=4)))``.

Per replica: ``max_concurrency`` requests decode, ``max_queue`` wait (429 beyond); Ray's ``max_ongoing_requests``
is set to their sum + 1 so Ray routes to the least loaded replica and a full replica still answers 429 itself.
The replica is started (engine loaded, warm-up passed) before Ray routes to it; Ray's graceful shutdown
(``graceful_shutdown_timeout_s`` = ``drain_timeout``) lets requests in flight finish.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from typing import Any

from .service import ServeConfig

log = logging.getLogger("legion_rt.serve")


def _import_ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        from ..errors import LegionError

        raise LegionError("legion-rt serve --ray needs Ray Serve: pip install 'legion_rt[ray]'") from None
    return ray, serve


def deployment(
    artifacts: str,
    config: ServeConfig,
    engine_kwargs: dict[str, Any] | None = None,
    *,
    name: str = "legion_rt",
    num_cpus: float | None = None,
):
    """A bound Ray Serve application: ``config.replicas`` replicas of the HTTP application over ``artifacts``.
    ``num_cpus``: CPUs Ray reserves per replica (default: Engine ``threads`` when given, else Ray's default)."""
    _, serve = _import_ray()
    cfg = dataclasses.asdict(config)
    ekw = dict(engine_kwargs or {})
    ekw.setdefault("max_concurrency", config.max_concurrency)
    ekw.setdefault("max_queue", config.max_queue)
    art = str(artifacts)
    if num_cpus is None and ekw.get("threads"):
        num_cpus = float(ekw["threads"])

    def build_asgi_app():  # runs in each replica
        from legion_rt.serve import make_engine
        from legion_rt.serve.app import create_app
        from legion_rt.serve.service import ServeConfig, Service

        service = Service(ServeConfig(**cfg), loader=lambda: make_engine(art, ekw))
        return create_app(service, start="blocking")

    ingress = serve.ingress(build_asgi_app)()
    return serve.deployment(
        ingress,
        name=name,
        num_replicas=config.replicas,
        max_ongoing_requests=config.max_concurrency + config.max_queue + 1,
        graceful_shutdown_timeout_s=max(1.0, config.drain_timeout),
        health_check_period_s=10,
        ray_actor_options={"num_cpus": float(num_cpus)} if num_cpus is not None else None,
    ).bind()


def build_app(args: dict[str, str]):
    """``serve run legion_rt.serve.ray_app:build_app artifacts=ART [replicas=N] [max_concurrency=N] ...``: every
    ServeConfig field by name, the Engine's ``backend``, ``threads``, ``providers``, ``verify``, and ``num_cpus``
    (CPUs Ray reserves per replica; default ``threads``)."""
    from . import OPTIONS, _convert

    args = dict(args)
    art = args.pop("artifacts", None) or os.environ.get("LEGION_RT_ARTIFACTS")
    if not art:
        raise ValueError("build_app needs artifacts=<artifact directory>")
    ekw: dict[str, Any] = {}
    for k in ("backend", "providers", "verify"):
        if k in args:
            ekw[k] = args.pop(k).split(",") if k == "providers" else args.pop(k)
    if "threads" in args:
        ekw["threads"] = int(args.pop("threads"))
    num_cpus = float(args.pop("num_cpus")) if "num_cpus" in args else None
    values: dict[str, Any] = {}
    for k, (env, *_rest) in OPTIONS.items():
        if k in args:
            values[k] = _convert(k, args.pop(k), k)
        elif os.environ.get(env):
            values[k] = _convert(k, os.environ[env], env)
    if args:
        raise ValueError(f"unknown argument(s): {', '.join(sorted(args))}")
    config = ServeConfig(**values)
    config.load_keys()
    return deployment(art, config, ekw, num_cpus=num_cpus)


def run_ray(artifacts: str, config: ServeConfig, engine_kwargs: dict[str, Any]) -> int:
    """``legion-rt serve --ray``: start (or join, with RAY_ADDRESS) Ray, serve on host:port until SIGTERM/SIGINT."""
    ray, serve = _import_ray()
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(
            include_dashboard=False, _node_ip_address="127.0.0.1" if config.host.startswith("127.") else None
        )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(deployment(artifacts, config, engine_kwargs), name="legion_rt", route_prefix="/")
        log.info(
            "Ray Serve: %d replica(s) on http://%s:%d (POST /v1/analyze)",
            config.replicas,
            config.host,
            config.port,
        )
        stop.wait()
        log.info("stopping: Ray Serve drains the replicas (up to %g s)", config.drain_timeout)
    finally:
        serve.shutdown()
        if not address:
            ray.shutdown()
    return 0
