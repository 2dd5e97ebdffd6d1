"""``legion-rt`` command line (also ``python -m legion_rt``). Commands and exit status: /work/shared/CONTRACT.md.

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
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from .errors import ArtifactError, ImageError, LegionError, RequestError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(LegionError):
    """A bad command-line value (exit 2)."""


def _err(msg: str) -> None:
    print(f"legion-rt: error: {msg}", file=sys.stderr, flush=True)


def _info(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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


def import_export():
    """The export package: ``legion_rt.export`` (wheel) or top-level ``export`` (source checkout)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise LegionError(
            "this command needs the export stage (torch, transformers, onnx): pip install 'legion_rt[export]'"
        ) from None
    import importlib

    for name in ("legion_rt.export", "export"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "__path__") and (Path(next(iter(mod.__path__))) / "onnx_export.py").is_file():
            return name
    raise LegionError("the export package is not installed (pip install 'legion_rt[export]')")


def _export_module(sub: str):
    import importlib

    return importlib.import_module(f"{import_export()}.{sub}")


# --------------------------------------------------------------------------------------------- commands
def cmd_export(args) -> int:
    onnx_export = _export_module("onnx_export")
    onnx_export.export_artifacts(
        checkpoint=args.checkpoint,
        clip=args.clip,
        detector=args.detector,
        out=args.out,
        precision=args.precision,
        progress=not args.quiet,
    )
    print(f"artifacts: {args.out}")
    return EXIT_OK


def cmd_make_tiny(args) -> int:
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a directory")
    tiny = _export_module("tiny")
    paths = tiny.make_tiny(args.out, seed=args.seed, size=args.size, steer=args.steer)
    print(f"checkpoint: {paths.checkpoint}\nclip: {paths.clip}\ndetector: {paths.detector}")
    return EXIT_OK


def _stream_one(engine, image, rgb, opts: dict[str, Any], *, quiet: bool, show_text: bool):
    """Run one picture, printing the answer text as it is generated. Returns the Result."""
    from .engine import DoneEvent, MaskEvent, TokenEvent

    result = None
    mid_line = False  # the streamed text has no newline yet
    printed = False
    try:
        events = engine.stream(rgb, **opts)  # checks the picture's geometry before any work
    except ImageError as e:  # it names the array it was given: name the file instead
        raise ImageError(f"{image}: {str(e).split(': ', 1)[-1]}") from None
    for ev in events:
        if isinstance(ev, TokenEvent):
            text = (
                ev.text if printed else ev.text.lstrip()
            )  # the answer's first piece carries a leading space
            if show_text and text:
                printed = True
                sys.stdout.write(text)
                sys.stdout.flush()
                mid_line = True
        elif isinstance(ev, MaskEvent):
            if not quiet:
                if mid_line:
                    sys.stdout.write("\n")
                    sys.stdout.flush()
                    mid_line = False
                a = ev.artifact
                _info(f"[mask {a.index + 1}] {a.phrase or '(no phrase)'}: bbox {a.bbox}, {a.area} px")
        elif isinstance(ev, DoneEvent):
            result = ev.result
    if mid_line:
        sys.stdout.write("\n")
    return result


def _summary(name: str, result) -> str:
    v = (
        "no detector"
        if result.verdict is None
        else f"{result.verdict} (P(fake) = {result.fake_probability:.4f})"
    )
    t = result.timings
    if result.skipped:
        return f"{name}: {v}; explanation skipped (detect-first gate: P(real) at or over --skip-if-real)"
    return (
        f"{name}: {v}; {len(result.token_ids)} tokens, {len(result.artifacts)} masks; "
        f"total {t['total']:.2f} s (first token {t.get('time_to_first_token', float('nan')):.3f} s)"
    )


def _printable(path) -> str:
    """A file name as valid Unicode: a non-UTF-8 name (surrogate escapes in ``str``) shows its bytes as ``\\xff``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _numbered(path: Path, stem: str, multi: bool) -> Path:
    return path.with_name(f"{path.stem}-{stem}{path.suffix}") if multi else path


def decode_all(images: list[str], max_pixels: int | None = None) -> list:
    """Decode every picture up front: a bad one fails the command before a model is loaded or a file written."""
    from .image import DEFAULT_MAX_PIXELS, load_image

    return [load_image(p, max_pixels=max_pixels or DEFAULT_MAX_PIXELS) for p in images]


def run_analyze(
    engine,
    images: list[str],
    rgbs: list,
    *,
    json_path,
    overlay_path,
    masks_dir,
    opts,
    quiet: bool,
    show_text=True,
) -> list:
    from .overlay import atomic_write_json, write_masks, write_overlay

    results = []
    multi = len(images) > 1
    for path, rgb in zip(images, rgbs, strict=True):
        if multi and show_text:
            _info(f"== {path}")
        result = _stream_one(engine, path, rgb, opts, quiet=quiet, show_text=show_text)
        results.append(result)
        if not quiet:
            _info(_summary(path, result))
        stem = Path(path).stem
        if overlay_path:
            target = _numbered(Path(overlay_path), stem, multi)
            out = _write(target, write_overlay, target, rgb, result)
            if not quiet:
                _info(f"overlay: {out}")
        if masks_dir:
            outs = _write(masks_dir, write_masks, masks_dir, result, stem=stem)
            if not quiet:
                _info(f"masks: {len(outs)} PNG files in {masks_dir}")
    if json_path:
        docs = [{"image": _printable(p), **r.to_dict()} for p, r in zip(images, results, strict=True)]
        _write(json_path, atomic_write_json, json_path, docs[0] if not multi else docs)
        if not quiet:
            _info(f"json: {json_path}")
    return results


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


def check_output_paths(*, json_path=None, overlay_path=None, masks_dir=None) -> None:
    """Refuse output paths that cannot be written before any work is done (a missing parent directory is
    created when writing, as before). Raises UsageError naming the option and path."""
    for opt, path in (("--json", json_path), ("--overlay", overlay_path)):
        if not path:
            continue
        p = Path(path)
        if p.is_dir():
            raise UsageError(f"{opt} {path}: is a directory; give a file name")
        parent = next((a for a in p.parents if a.exists()), None)
        if parent is not None and not parent.is_dir():
            raise UsageError(f"{opt} {path}: {parent} is not a directory")
    if overlay_path and Path(overlay_path).suffix.lower() != ".png":
        raise UsageError(f"--overlay {overlay_path}: the overlay is written as PNG; give a .png file name")
    if masks_dir:
        p = Path(masks_dir)
        blocker = next((a for a in (p, *p.parents) if a.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise UsageError(f"--masks-dir {masks_dir}: {blocker} is not a directory")


def _write(path, writer, *args, **kwargs):
    """``writer(*args, **kwargs)``; an OS error (disk full, permission) becomes one line naming the file."""
    try:
        return writer(*args, **kwargs)
    except OSError as e:
        raise LegionError(f"{path}: cannot write ({e.strerror or e})") from None


def cmd_analyze(args) -> int:
    check_output_paths(json_path=args.json, overlay_path=args.overlay, masks_dir=args.masks_dir)
    rgbs = decode_all(args.images)
    engine = engine_from_args(args)
    if not args.quiet:
        _info(f"backend: {engine.backend_name} ({', '.join(engine.providers)})")
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


def cache_dir() -> Path:
    return Path(os.environ.get("LEGION_RT_CACHE") or Path.home() / ".cache" / "legion_rt")


def demo_picture() -> Path:
    return Path(__file__).resolve().parent / "assets" / "demo.jpg"


def ensure_tiny_artifacts(cache: Path, *, seed: int = 0, size: str = "tiny", quiet: bool = False) -> Path:
    """make-tiny + export into ``cache`` once; later calls reuse it (rebuilt when verification fails)."""
    from .artifacts import load_artifacts

    art = cache / f"{size}-seed{seed}-art"
    try:
        load_artifacts(art, verify="full")
        return art
    except ArtifactError:
        pass
    ckpt = cache / f"{size}-seed{seed}"
    record = ckpt / "make_tiny.json"  # written last: its presence means the checkpoint is complete
    if not record.is_file():
        if not quiet:
            _info(f"making a tiny random-weight checkpoint in {ckpt} ...")
        tiny = _export_module("tiny")
        if ckpt.exists():
            shutil.rmtree(ckpt)
        paths = tiny.make_tiny(ckpt, seed=seed, size=size)
        doc = {
            k: (None if getattr(paths, k) is None else str(getattr(paths, k)))
            for k in ("checkpoint", "clip", "detector")
        }
        record.write_text(json.dumps(doc))
    doc = json.loads(record.read_text())
    if not quiet:
        _info(f"exporting it to {art} ...")
    onnx_export = _export_module("onnx_export")
    if art.exists() and not (art / "manifest.json").is_file():
        shutil.rmtree(art)
    onnx_export.export_artifacts(
        checkpoint=doc["checkpoint"], clip=doc["clip"], detector=doc["detector"], out=art, progress=not quiet
    )
    return art


def cmd_demo(args) -> int:
    from .engine import Engine

    cache = Path(args.cache) if args.cache else cache_dir()
    art = Path(args.artifacts) if args.artifacts else ensure_tiny_artifacts(cache, quiet=args.quiet)
    engine = Engine(art, backend="onnxruntime", providers=["cpu"], threads=args.threads)
    picture = Path(args.image) if args.image else demo_picture()
    out = Path(args.out)
    if not args.quiet:
        _info(f"analyzing {picture} on ONNX Runtime ({', '.join(engine.providers)}); streamed answer:")
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
        _info(
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
            _, cudart = trt_backend._import_trt()
            count = trt_backend._check(cudart.cudaGetDeviceCount())
        except LegionError:
            count = 0
        if not count:
            raise LegionError("build-engines needs an NVIDIA GPU: no CUDA device is visible")
    out = trt_backend.build_engines(art, args.precision, log=_info)
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
