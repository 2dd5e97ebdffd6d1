"""``legion-rt`` command line (also ``python -m legion_rt``): the parser and the dispatch to each command.
Commands, options and exit status: docs/CONTRACT.md "Command line". Analyze runs are in legion_rt/analyze.py,
output files in legion_rt/outputs.py and legion_rt/overlay.py, the demo's bootstrapping in legion_rt/demo.py.

Exit 0 on success, 2 on a usage error (bad option or value), 1 on any other failure; expected failures print one
line ``legion-rt: error: ...`` on stderr naming the file or value, never a traceback (set LEGION_RT_DEBUG=1 to
see one). Every output file is written atomically (temporary file + rename).

The export-stage commands (``export``, ``make-tiny``, and the first run of ``demo``) need the export extra
(torch, transformers, onnx); they import the export package lazily: ``legion_rt.export`` from a wheel, else the
top-level ``export`` of a source checkout. ``eval`` (legion_rt/evaluate.py) needs OpenCV for LEGION's polygon
rasterization; ``serve`` (legion_rt/serve/) needs the serve extra (FastAPI, uvicorn), imported lazily.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .analyze import decode_all, run_analyze
from .demo import cache_dir, demo_picture, ensure_tiny_artifacts, export_module
from .errors import LegionError, RequestError, UsageError
from .outputs import check_output_paths, info

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _err(msg: str) -> None:
    print(f"legion-rt: error: {msg}", file=sys.stderr, flush=True)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (the contract: one stderr line naming the value), exit 2."""

    def error(self, message: str):
        first = message.splitlines()[0] if message else "bad usage"
        self.exit(EXIT_USAGE, f"legion-rt: error: {first} (see `{self.prog} --help`)\n")


def _ranged(cast, lo: float | None = None, hi: float | None = None):
    """An argparse type: ``cast(text)`` within [lo, hi] (NaN is refused), with a one-line message otherwise."""
    noun = "an integer" if cast is int else "a number"
    if hi is None:
        bound = f"must be >= {lo}"
    else:
        bound = f"must be in [{lo}, {hi}]"

    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not ((lo is None or v >= lo) and (hi is None or v <= hi)):  # written so that NaN fails
            raise argparse.ArgumentTypeError(f"{text!r} {bound}")
        return v

    return parse


_positive_int = _ranged(int, 1)
_port = _ranged(int, 0, 65535)
_probability = _ranged(float, 0, 1)
_nonneg_float = _ranged(float, 0)


# --------------------------------------------------------------------------------------------- commands
def cmd_export(args) -> int:
    onnx_export = export_module("onnx_export")
    onnx_export.export_artifacts(
        checkpoint=args.checkpoint,
        clip=args.clip,
        detector=args.detector,
        out=args.out,
        precision=args.precision,
        progress=not args.quiet,
        llm_graph=args.llm_graph,
    )
    print(f"artifacts: {args.out}")
    return EXIT_OK


def cmd_make_tiny(args) -> int:
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a directory")
    tiny = export_module("tiny")
    paths = tiny.make_tiny(args.out, seed=args.seed, size=args.size, steer=args.steer)
    print(f"checkpoint: {paths.checkpoint}\nclip: {paths.clip}\ndetector: {paths.detector}")
    return EXIT_OK


def engine_from_args(args):
    """The Engine that the --artifacts/--backend/--providers/--threads/--verify options ask for."""
    from .engine import Engine

    providers = args.providers.split(",") if getattr(args, "providers", None) else None
    return Engine(
        args.artifacts,
        backend=args.backend,
        threads=args.threads,
        providers=providers,
        verify=args.verify,
    )


def _request_opts(args) -> dict[str, Any]:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "skip_if_real": args.skip_if_real,
    }


def cmd_analyze(args) -> int:
    check_output_paths(json_path=args.json, overlay_path=args.overlay, masks_dir=args.masks_dir)
    rgbs = decode_all(args.images)
    engine = engine_from_args(args)
    if not args.quiet:
        info(f"backend: {engine.backend_name} ({', '.join(engine.providers)})")
    run_analyze(
        engine,
        args.images,
        rgbs,
        json_path=args.json,
        overlay_path=args.overlay,
        masks_dir=args.masks_dir,
        opts=_request_opts(args),
        quiet=args.quiet,
    )
    return EXIT_OK


def cmd_demo(args) -> int:
    from .engine import Engine

    cache = Path(args.cache) if args.cache else cache_dir()
    art = Path(args.artifacts) if args.artifacts else ensure_tiny_artifacts(cache, quiet=args.quiet)
    engine = Engine(art, backend="onnxruntime", providers=["cpu"], threads=args.threads)
    picture = Path(args.image) if args.image else demo_picture()
    out = Path(args.out)
    if not args.quiet:
        info(f"analyzing {picture} on ONNX Runtime ({', '.join(engine.providers)}); streamed answer:")
    opts = {"max_new_tokens": args.max_new_tokens}
    run_analyze(
        engine,
        [str(picture)],
        decode_all([str(picture)]),
        json_path=out / "result.json",
        overlay_path=out / "overlay.png",
        masks_dir=out / "masks",
        opts=opts,
        quiet=args.quiet,
    )
    print(f"demo outputs in {out.resolve()}: result.json, overlay.png, masks/")
    if art.parent == cache and not args.quiet:
        info(
            "(the tiny model has random weights: its text is random. For a real checkpoint run "
            "`legion-rt export --checkpoint CKPT --clip CLIP --out ART` then `legion-rt analyze IMAGE --artifacts ART`.)"
        )
    return EXIT_OK


def cmd_build_engines(args) -> int:
    from .artifacts import load_artifacts
    from .backends import tensorrt as trt_backend

    art = load_artifacts(args.artifacts, verify=args.verify)
    trt_backend._import_trt()  # clear "TensorRT is not installed" error first
    import legion_rt

    if not legion_rt.cuda_available():
        try:
            _, cuda = trt_backend._import_trt()
            count = cuda.check(cuda.rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
        except LegionError:
            count = 0
        if not count:
            raise LegionError("build-engines needs an NVIDIA GPU: no CUDA device is visible")
    out = trt_backend.build_engines(
        art,
        args.precision,
        log=info,
        workspace_gb=args.workspace_gb,
        max_context=args.max_context,
        fp32_layers=tuple(args.fp32_layers),
        timing_cache=not args.no_timing_cache,
    )
    print(f"engines: {out}")
    return EXIT_OK


def _later(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(f".{module}", __package__)
    except ModuleNotFoundError:
        raise UsageError(f"{what} is not implemented yet in this version of legion-rt") from None


def cmd_serve(args) -> int:
    return int(_later("serve", "serve (the HTTP service)").main(args) or 0)


def cmd_eval(args) -> int:
    return int(_later("evaluate", "eval (SynthScars evaluation)").main(args) or 0)


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="legion-rt", description="LEGION inference runtime")
    from . import __version__

    p.add_argument("--version", action="version", version=f"legion-rt {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def engine_opts(sp, *, artifacts_flag=True):
        if artifacts_flag:
            sp.add_argument(
                "--artifacts", required=True, metavar="ART", help="artifact directory (legion-rt export)"
            )
        sp.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"])
        sp.add_argument("--providers", default=None, help="ONNX Runtime providers, e.g. cpu or cuda,cpu")
        sp.add_argument("--threads", type=_positive_int, default=None, help="intra-op threads per graph")
        sp.add_argument("--verify", default="full", choices=["full", "size", "none"], help="artifact check")

    e = sub.add_parser("export", help="checkpoint + CLIP -> artifact directory")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--clip", required=True)
    e.add_argument("--detector", default=None)
    e.add_argument("--out", required=True)
    e.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    e.add_argument(
        "--llm-graph",
        default="gqa",
        choices=["gqa", "standard", "both"],
        help="LLM graph: gqa (ONNX Runtime's GroupQueryAttention, default), standard (standard ONNX operators, "
        "TensorRT can build it) or both (llm.onnx + llm_standard.onnx)",
    )
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_export)

    a = sub.add_parser("analyze", help="analyze pictures (streams the explanation)")
    a.add_argument("images", nargs="+", metavar="IMAGE")
    engine_opts(a)
    a.add_argument("--json", default=None, metavar="FILE")
    a.add_argument("--overlay", default=None, metavar="FILE", help="PNG with masks tinted and boxes drawn")
    a.add_argument("--masks-dir", default=None, metavar="DIR", help="also write each mask as a PNG here")
    a.add_argument("--max-new-tokens", type=_positive_int, default=512)
    a.add_argument("--temperature", type=_nonneg_float, default=0.0, help="0 = greedy (default)")
    a.add_argument("--top-p", type=_probability, default=1.0)
    a.add_argument("--seed", type=int, default=None)
    a.add_argument(
        "--skip-if-real",
        type=_probability,
        default=None,
        metavar="P",
        help="detect-first gating: verdict only when P(real) >= P",
    )
    a.add_argument("--quiet", action="store_true")
    a.set_defaults(func=cmd_analyze)

    t = sub.add_parser("make-tiny", help="write a small random-weight checkpoint (tests, demo)")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--size", default="tiny", choices=["tiny", "small"])
    t.add_argument(
        "--steer",
        default="loop",
        choices=["loop", "free"],
        help="loop: a fixed token loop with [SEG]/<p>/</p> (default); free: random text that depends on the picture",
    )
    t.set_defaults(func=cmd_make_tiny)

    d = sub.add_parser(
        "demo", help="make-tiny (cached), export, analyze a bundled picture on ONNX Runtime CPU"
    )
    d.add_argument("--out", default="legion-demo", help="output directory (default ./legion-demo)")
    d.add_argument(
        "--cache", default=None, help="cache directory (default $LEGION_RT_CACHE or ~/.cache/legion_rt)"
    )
    d.add_argument("--artifacts", default=None, help="use this artifact directory instead of the tiny model")
    d.add_argument("--image", default=None, help="analyze this picture instead of the bundled one")
    d.add_argument("--max-new-tokens", type=_positive_int, default=128)
    d.add_argument("--threads", type=_positive_int, default=None)
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("build-engines", help="build TensorRT engines for this GPU")
    b.add_argument("artifacts", metavar="ART")
    b.add_argument("--precision", default="fp16", choices=["fp16", "int8", "fp8", "int4"])
    b.add_argument("--verify", default="full", choices=["full", "size", "none"])
    b.add_argument(
        "--workspace-gb",
        type=_ranged(float, 0.01),
        default=8.0,
        help="TensorRT workspace pool in GB (default 8, all of an Orin Nano's memory: use 1-2 there)",
    )
    b.add_argument(
        "--max-context",
        type=_positive_int,
        default=None,
        help="positions the LLM engine's KV profile covers (default: the model's max_position_embeddings)",
    )
    b.add_argument(
        "--fp32-layers",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also keep layers whose name matches PATTERN (shell-style) in fp32 (repeatable; reductions, "
        "normalizations and softmax always are in an fp32-graph build)",
    )
    b.add_argument(
        "--no-timing-cache", action="store_true", help="do not read or write tensorrt/*/timing.cache"
    )
    b.set_defaults(func=cmd_build_engines)

    s = sub.add_parser("serve", help="HTTP service (the serve extra)")
    engine_opts(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=_port, default=8000)
    from .serve import add_serve_arguments  # imports no web framework

    add_serve_arguments(s)
    s.set_defaults(func=cmd_serve)

    v = sub.add_parser("eval", help="SynthScars-format evaluation (mIoU, F1)")
    engine_opts(v)
    v.add_argument("--dataset", required=True)
    v.add_argument("--split", default="test")
    v.add_argument("--max-new-tokens", type=_positive_int, default=512)
    v.add_argument("--limit", type=_positive_int, default=None)
    v.add_argument("--json", default=None, metavar="FILE")
    v.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: 0 for --help/--version, 2 for usage errors (message already printed)
        return int(e.code or 0)
    debug = bool(os.environ.get("LEGION_RT_DEBUG"))
    try:
        return int(args.func(args) or 0)
    except (UsageError, RequestError) as e:
        _err(str(e))
        return EXIT_USAGE
    except LegionError as e:
        if debug:
            raise
        _err(str(e))
        return EXIT_FAIL
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:
        return EXIT_FAIL
    except Exception as e:  # unexpected: still one line, with a hint for the traceback
        if debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        _err(f"{type(e).__name__}: {msg} (set LEGION_RT_DEBUG=1 for a traceback)")
        return EXIT_FAIL


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
