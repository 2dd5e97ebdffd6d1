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
from .errors import ImageError, LegionError, RequestError, UsageError
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


def _checked_pictures(args, max_pixels=None) -> tuple[list[str], dict[str, str]]:
    """Expand the picture arguments (files, directories, globs) and check each header cheaply. Returns the
    pictures to run and, with --keep-going, the ones refused (name -> message); without it the first bad
    picture raises before any model is loaded."""
    from .image import DEFAULT_MAX_PIXELS
    from .inputs import check_header, expand

    pictures = expand(args.images)
    if getattr(args, "resume", False):
        from .outputs import printable, read_done

        done = read_done(args.jsonl)
        skipped = [p for p in pictures if printable(p) in done]
        pictures = [p for p in pictures if printable(p) not in done]
        if skipped and not args.quiet:
            info(f"resume: {len(skipped)} pictures already in {args.jsonl}, {len(pictures)} to go")
    ok, bad = [], {}
    for p in pictures:
        try:
            check_header(p, max_pixels or DEFAULT_MAX_PIXELS)
        except LegionError as e:
            if not getattr(args, "keep_going", False):
                raise
            bad[p] = str(e)
            continue
        ok.append(p)
    return ok, bad


def _jsonl_options(args) -> None:
    from .outputs import check_jsonl_path

    if args.resume and not args.jsonl:
        raise UsageError("--resume needs --jsonl FILE (the file of the earlier run)")
    if args.resume and args.jsonl == "-":
        raise UsageError("--resume needs --jsonl FILE, not stdout")
    check_jsonl_path("--jsonl", args.jsonl)


def cmd_analyze(args) -> int:
    from .outputs import JsonlWriter, printable

    check_output_paths(json_path=args.json, overlay_path=args.overlay, masks_dir=args.masks_dir)
    _jsonl_options(args)
    pictures, bad = _checked_pictures(args)
    if not pictures and not bad:
        if not args.quiet:
            info("nothing to do: every picture is already in " + str(args.jsonl))
        return EXIT_OK
    rgbs = None
    if len(pictures) == 1:
        # One picture: decoded before the model loads, so a picture that fails to decode fails the command
        # before anything is printed or written (several pictures are decoded one at a time instead).
        try:
            rgbs = decode_all(pictures)
        except ImageError as e:
            if not args.keep_going:
                raise
            bad[pictures[0]] = str(e)
            pictures = []
    engine = engine_from_args(args) if pictures else None
    if engine is not None and not args.quiet:
        info(f"backend: {engine.backend_name} ({', '.join(engine.providers)})")
    jsonl = JsonlWriter(args.jsonl) if args.jsonl else None
    errors = dict(bad)
    try:
        if jsonl is not None:
            for p, msg in bad.items():
                jsonl.write({"image": printable(p), "error": msg})
        for p, msg in bad.items():
            if not args.quiet:
                info(f"{p}: error: {msg}")
        if pictures:
            run_analyze(
                engine,
                pictures,
                rgbs,
                json_path=args.json,
                overlay_path=args.overlay,
                masks_dir=args.masks_dir,
                opts=_request_opts(args),
                quiet=args.quiet,
                show_text=not args.jsonl,
                jsonl=jsonl,
                keep_going=args.keep_going,
                errors=errors,
            )
    finally:
        if jsonl is not None:
            jsonl.close()
    if errors:
        _err(f"{len(errors)} of {len(pictures) + len(bad)} pictures failed (see the error lines)")
        return EXIT_FAIL
    return EXIT_OK


def cmd_classify(args) -> int:
    from .classify import iter_classify
    from .outputs import JsonlWriter, printable
    from .progress import make_progress

    _jsonl_options(args)
    pictures, bad = _checked_pictures(args)
    engine = engine_from_args(args)
    errors = dict(bad)
    jsonl = JsonlWriter(args.jsonl) if args.jsonl else None
    progress = make_progress(len(pictures), quiet=args.quiet or len(pictures) < 2, what="pictures")

    def on_error(image, e) -> None:
        errors[image] = str(e)
        if jsonl is not None:
            jsonl.write({"image": printable(image), "error": str(e)})
        progress.advance(f"{image}: error: {e}", ok=False)

    try:
        for p, msg in bad.items():
            on_error(p, msg)
        for c in iter_classify(
            engine,
            pictures,
            batch_size=args.batch_size,
            on_error=on_error if args.keep_going else None,
        ):
            doc = c.to_dict()
            doc["image"] = printable(c.image)
            if jsonl is not None:
                jsonl.write(doc)
            line = f"{doc['image']}\t{c.verdict}\t{c.fake_probability:.6f}"
            if jsonl is None:
                print(line, flush=True)  # the answer itself, on stdout
            elif args.jsonl != "-":
                progress.advance(line.replace("\t", " "), ok=True)
    finally:
        progress.close()
        if jsonl is not None:
            jsonl.close()
    if errors:
        _err(f"{len(errors)} of {len(pictures) + len(bad)} pictures failed")
        return EXIT_FAIL
    return EXIT_OK


def cmd_watch(args) -> int:
    from .watch import main as watch_main

    return int(watch_main(args, engine_from_args) or 0)


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
    e.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "int4"])
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
    a.add_argument(
        "images", nargs="+", metavar="IMAGE", help="picture files, directories (recursive) or glob patterns"
    )
    engine_opts(a)
    a.add_argument("--json", default=None, metavar="FILE")
    a.add_argument(
        "--jsonl", default=None, metavar="FILE", help="append one Result JSON line per picture as it finishes"
    )
    a.add_argument(
        "--keep-going",
        action="store_true",
        help='a bad picture gets an {"image", "error"} line and the run goes on (exit 1 at the end)',
    )
    a.add_argument("--resume", action="store_true", help="skip pictures that already have a line in --jsonl")
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

    c = sub.add_parser("classify", help="verdicts only, batched (no LLM, no SAM)")
    c.add_argument(
        "images", nargs="+", metavar="IMAGE", help="picture files, directories (recursive) or glob patterns"
    )
    engine_opts(c)
    c.add_argument("--batch-size", type=_positive_int, default=8, metavar="N")
    c.add_argument(
        "--jsonl", default=None, metavar="FILE", help="append one JSON line per picture ('-': stdout)"
    )
    c.add_argument(
        "--keep-going", action="store_true", help="a bad picture gets an error line; exit 1 at the end"
    )
    c.add_argument("--resume", action="store_true", help="skip pictures that already have a line in --jsonl")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_classify)

    w = sub.add_parser("watch", help="analyze a video, camera, URL or frame directory frame by frame")
    w.add_argument(
        "source", metavar="SOURCE", help="video file, frame directory, /dev/videoN, camera index, URL"
    )
    engine_opts(w)
    sampling = w.add_mutually_exclusive_group()
    sampling.add_argument("--every", type=_positive_int, default=None, metavar="N", help="every N-th frame")
    sampling.add_argument(
        "--fps",
        type=_ranged(float, 1e-6),
        default=None,
        metavar="F",
        help="F frames per second of stream time",
    )
    w.add_argument(
        "--min-change",
        type=_probability,
        default=None,
        metavar="T",
        help="skip frames that changed less than T in [0, 1] since the last analyzed one",
    )
    w.add_argument(
        "--jsonl", default=None, metavar="FILE", help="one JSON line per considered frame ('-': stdout)"
    )
    w.add_argument(
        "--limit-frames", type=_positive_int, default=None, metavar="K", help="stop after K frames"
    )
    w.add_argument(
        "--video-out",
        default=None,
        metavar="FILE",
        help="annotated video of the considered frames (.avi or .mp4)",
    )
    w.add_argument("--max-new-tokens", type=_positive_int, default=512)
    w.add_argument("--skip-if-real", type=_probability, default=None, metavar="P")
    w.add_argument("--quiet", action="store_true")
    w.set_defaults(func=cmd_watch)

    t = sub.add_parser("make-tiny", help="write a small random-weight checkpoint (tests, demo)")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--size",
        default="tiny",
        choices=["tiny", "small", "full"],
        help="full: the released shapes (LLaMA-7B, SAM ViT-H, CLIP ViT-L; ~15 GB bf16 + 1.2 GB CLIP), streamed",
    )
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
