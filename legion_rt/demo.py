"""The demo's bootstrapping: the export stage imported on demand, and a tiny random-weight model made and
exported once into a cache directory (``$LEGION_RT_CACHE`` or ``~/.cache/legion_rt``)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import ArtifactError, LegionError
from .outputs import info


def export_module(sub: str):
    """``legion_rt.export.<sub>``: the export stage (torch), imported on demand. It is ``export/`` of the source
    tree, installed as ``legion_rt.export`` by the wheel and by the editable install alike."""
    import importlib

    try:
        import torch  # noqa: F401
    except ImportError:
        raise LegionError(
            "this command needs the export stage (torch, transformers, onnx): pip install 'legion_rt[export]'"
        ) from None
    try:
        return importlib.import_module(f"legion_rt.export.{sub}")
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("legion_rt.export"):
            raise LegionError("the export stage is not installed (pip install 'legion_rt[export]')") from None
        raise LegionError(f"the export stage needs {e.name}: pip install 'legion_rt[export]'") from None


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
            info(f"making a tiny random-weight checkpoint in {ckpt} ...")
        tiny = export_module("tiny")
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
        info(f"exporting it to {art} ...")
    onnx_export = export_module("onnx_export")
    if art.exists() and not (art / "manifest.json").is_file():
        shutil.rmtree(art)
    onnx_export.export_artifacts(
        checkpoint=doc["checkpoint"], clip=doc["clip"], detector=doc["detector"], out=art, progress=not quiet
    )
    return art
