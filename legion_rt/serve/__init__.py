"""``legion-rt serve``: the HTTP service (FastAPI on uvicorn; Ray Serve for scale-out). Needs the ``serve`` extra
(``pip install 'legion_rt[serve]'``); this module itself imports none of it, so the CLI parser stays cheap.

Routes, options, status codes: README.md "HTTP service" and docs/http.md.

- ``legion_rt.serve.service``: state, admission, the request thread, options, metrics (no web framework);
- ``legion_rt.serve.app``: ``create_app(service)``, the FastAPI application;
- ``legion_rt.serve.runner``: uvicorn with SIGTERM as a drain;
- ``legion_rt.serve.ray_app``: the Ray Serve deployment of the same application.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from ..errors import LegionError, RequestError

# option -> (environment variable, type, lower bound, default, help)
OPTIONS: dict[str, tuple[str, type, float, Any, str]] = {
    "max_concurrency": ("LEGION_RT_MAX_CONCURRENCY", int, 1, 1, "requests decoding at once"),
    "max_queue": ("LEGION_RT_MAX_QUEUE", int, 0, 8, "requests waiting for a slot (FIFO); one more is a 429"),
    "timeout": (
        "LEGION_RT_TIMEOUT",
        float,
        0,
        120.0,
        "seconds per request, queueing included (504); 0 = none",
    ),
    "max_new_tokens_limit": (
        "LEGION_RT_MAX_NEW_TOKENS_LIMIT",
        int,
        1,
        512,
        "a request asking for more max_new_tokens is a 422",
    ),
    "max_body_bytes": ("LEGION_RT_MAX_BODY_BYTES", int, 1, 64 * 1024 * 1024, "413 over it"),
    "api_key_file": ("LEGION_RT_API_KEY_FILE", str, 0, None, "Bearer keys, one a line (401 without one)"),
    "drain_timeout": (
        "LEGION_RT_DRAIN_TIMEOUT",
        float,
        0,
        30.0,
        "seconds SIGTERM waits for requests in flight",
    ),
    "read_timeout": ("LEGION_RT_READ_TIMEOUT", float, 0.001, 60.0, "seconds to receive a body (408 after)"),
    "keepalive": ("LEGION_RT_KEEPALIVE", float, 0.01, 2.0, "seconds between SSE keep-alive comments"),
    "replicas": ("LEGION_RT_REPLICAS", int, 1, 1, "Ray Serve replicas (with --ray)"),
}


def _convert(name: str, text: str, source: str):
    _, cast, lo, _, _ = OPTIONS[name]
    if cast is str:
        return text
    try:
        v = cast(text)
    except ValueError:
        noun = "an integer" if cast is int else "a number"
        raise RequestError(f"{source}: {text!r} is not {noun}") from None
    if not v >= lo:  # written so that NaN fails
        raise RequestError(f"{source}: {text!r} must be >= {lo:g}")
    return v


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The service's options (host, port and the engine options are the CLI's)."""
    for name, (env, cast, _, default, help_) in OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(
            flag,
            default=None,
            metavar="PATH" if cast is str else "N",
            help=f"{help_} (${env}; default {default})",
        )
    parser.add_argument("--ray", action="store_true", help="serve through Ray Serve (the 'ray' extra)")
    parser.add_argument("--no-warmup", action="store_true", help="ready without the warm-up request")


def config_from_args(args):
    """ServeConfig from the options, else the LEGION_RT_* environment, else the defaults."""
    from .service import ServeConfig

    values: dict[str, Any] = {}
    for name, (env, _, _, default, _) in OPTIONS.items():
        given = getattr(args, name, None)
        if given is not None:
            values[name] = _convert(name, given, "--" + name.replace("_", "-"))
        elif os.environ.get(env, "") != "":
            values[name] = _convert(name, os.environ[env], env)
        else:
            values[name] = default
    return ServeConfig(
        host=args.host,
        port=args.port,
        ray=bool(getattr(args, "ray", False)),
        warmup=not getattr(args, "no_warmup", False),
        **values,
    )


def engine_kwargs(args, config) -> dict[str, Any]:
    """Engine(...) keyword arguments from the CLI's engine options and the admission limits."""
    providers = args.providers.split(",") if getattr(args, "providers", None) else None
    return {
        "backend": args.backend,
        "threads": args.threads,
        "providers": providers,
        "verify": args.verify,
        "max_concurrency": config.max_concurrency,
        "max_queue": config.max_queue,
    }


def make_engine(artifacts, kwargs: dict[str, Any]):
    """The Engine the service runs, with the service's admission limits (``max_concurrency``, ``max_queue``)."""
    from ..engine import Engine

    return Engine(artifacts, **kwargs)


def require_serve_extra() -> None:
    missing = []
    for mod in ("fastapi", "uvicorn", "prometheus_client", "multipart"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise LegionError(f"legion-rt serve needs {', '.join(missing)}: pip install 'legion_rt[serve]'")


def _setup_logging() -> None:
    logger = logging.getLogger("legion_rt.serve")
    if not logger.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s legion-rt %(levelname)s %(message)s"))
        logger.addHandler(h)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def run(args) -> int:
    """``legion-rt serve --artifacts ART [options]``: serve until SIGTERM/SIGINT (drained), exit 0."""
    require_serve_extra()
    config = config_from_args(args)
    config.load_keys()
    _setup_logging()
    kwargs = engine_kwargs(args, config)
    if config.ray:
        from .ray_app import run_ray

        return run_ray(str(args.artifacts), config, kwargs)
    from .app import create_app
    from .runner import bind, serve_app
    from .service import Service

    sock = bind(config.host, config.port)  # a busy port fails now, before the model loads
    service = Service(config, loader=lambda: make_engine(args.artifacts, kwargs))
    serve_app(create_app(service), service, config, sock=sock)
    if service.state == "failed":
        raise LegionError(service.error or "the service failed to start")
    return 0


main = run  # legion_rt.cli calls serve.main(args)
