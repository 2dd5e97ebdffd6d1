"""Inference backends behind one small interface.

A backend runs the four graphs of an artifact directory (docs/FORMAT.md):

```python
backend.vision(clip_pixels)              # f32 [1,3,336,336] -> (image_embeds f32 [1,576,H], cls_logits f32 [1,2] | None)
backend.sam_encoder(sam_pixels)          # f32 [1,3,1024,1024] -> image_embedding f32 [1,256,64,64]
backend.mask_head(seg_hidden, embedding) # f32 [N,H], f32 [1,256,64,64] -> low_res f32 [N,256,256]
backend.llm                              # OrtLLM-like: new_cache(max_len) / forward(cache, embeds) / clone_cache
backend.name                             # "onnxruntime" | "tensorrt"
backend.providers                        # what actually runs, e.g. ["CPUExecutionProvider"]
```
On a GPU the backends also take device buffers (backends/device_buffer.py ``DeviceBuffer``) for the
device-resident request (legion_rt/device_path.py ``DevicePath``): ``backend.device_io``, ``vision_device(clip,
stream)``, ``sam_encoder_device(pixels, out, stream)``, ``mask_head_device(seg_hidden, embedding, out, stream)``;
``runs_on_caller_stream`` says whether they enqueue on ``stream`` (TensorRT) or on their own (ONNX Runtime).
Every method may be called from several threads at once (ONNX Runtime sessions are thread-safe for ``run``).
``create_backend`` picks one by name; asking for something unavailable raises ``BackendError``, never a silent
fallback. ``"auto"`` picks the best available (TensorRT engines built for this GPU, else ONNX Runtime with CUDA,
else ONNX Runtime on CPU) and the choice is visible in ``backend.name`` / ``backend.providers``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import RequestError

if TYPE_CHECKING:  # pragma: no cover
    from ..artifacts import ArtifactDir

BACKENDS = ("auto", "onnxruntime", "tensorrt")


class Backend(Protocol):
    name: str
    providers: list[str]
    llm: Any

    def vision(self, clip_pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]: ...

    def sam_encoder(self, sam_pixels: np.ndarray) -> np.ndarray: ...

    def mask_head(self, seg_hidden: np.ndarray, embedding: np.ndarray) -> np.ndarray: ...


def create_backend(
    art: ArtifactDir,
    backend: str = "auto",
    *,
    threads: int | None = None,
    providers: list[str] | tuple[str, ...] | str | None = None,
) -> Backend:
    """Create the backend named ``backend`` for the verified artifact directory ``art``.

    ``threads``: intra-op threads per session (None: ONNX Runtime's default, one per physical core).
    ``providers``: ONNX Runtime providers by short name ("cpu", "cuda", "tensorrt") or full name, in order of
    preference; only with backend "onnxruntime"/"auto". Unavailable -> ``BackendError``.
    """
    if backend not in BACKENDS:
        raise RequestError(f"backend={backend!r}: must be one of {', '.join(BACKENDS)}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise RequestError(f"threads={threads!r}: must be a positive integer or None")
    if backend == "tensorrt":
        if providers is not None:
            raise RequestError("providers= applies to the onnxruntime backend only")
        from .tensorrt import TensorRTBackend

        return TensorRTBackend(art, threads=threads)
    if backend == "auto" and providers is None:
        from . import tensorrt as trt_mod

        if trt_mod.engines_usable(art):
            return trt_mod.TensorRTBackend(art, threads=threads)
    from .onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(art, threads=threads, providers=providers, auto=(backend == "auto"))
