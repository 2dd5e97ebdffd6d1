"""legion_rt: an optimized inference runtime for LEGION.

Importing this package never imports torch, transformers or onnx, and never calls CUDA.
"""

from __future__ import annotations

from .errors import (
    ArtifactError,
    BackendError,
    BusyError,
    CheckpointError,
    DeadlineError,
    ImageError,
    LegionError,
    RequestError,
)

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "BackendError",
    "BusyError",
    "CheckpointError",
    "DeadlineError",
    "Engine",
    "ImageError",
    "LegionError",
    "RequestError",
    "cuda_available",
    "ops",
    "__version__",
]


def cuda_available() -> bool:
    """True when the native core was built with CUDA and a CUDA device is present. Never raises."""
    try:
        from . import ops

        return bool(ops.cuda_available())
    except Exception:
        return False


def __getattr__(name: str):
    # Lazy: `import legion_rt` stays cheap (no onnxruntime, no native library) until used.
    if name == "Engine":
        from .engine import Engine

        return Engine
    if name in ("Result", "Artifact", "TokenEvent", "MaskEvent", "DoneEvent"):
        from . import result

        return getattr(result, name)
    if name == "Classification":
        from .classify import Classification

        return Classification
    if name == "FrameResult":
        from .watch import FrameResult

        return FrameResult
    if name == "ops":
        import importlib

        return importlib.import_module(".ops", __name__)
    raise AttributeError(f"module 'legion_rt' has no attribute {name!r}")
