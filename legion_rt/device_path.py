"""The CUDA kernels in the request path: which path a request takes, the device buffers it needs, and bit-packed
masks.

``select_ops(backend)`` gives the Engine the object it calls for ``preprocess`` and ``postprocess_masks``:

* ``legion_rt.ops`` (the CPU kernels, the path as it always was) when the graphs run on the CPU, or the native core
  has no CUDA kernels, or no device is usable, or cuda-python is missing — ``PathChoice.reason`` says which;
* ``DeviceOps`` when the graphs run on an NVIDIA GPU (TensorRT backend, or ONNX Runtime with the CUDA / TensorRT
  provider first) and the CUDA kernels can run: the picture is uploaded once as uint8 and ``preprocess_cuda``
  writes the CLIP and SAM inputs on the device; the mask head's low-resolution output is post-processed by
  ``postprocess_masks_cuda`` on the device, the masks are bit-packed there (``pack_masks_cuda``) and only the packed
  masks, boxes and areas come back (1/8 of the mask bytes), unpacked on the host by ``unpack_masks``.

What is wired and what is not (README "What has and has not run"): the backends still take and return host arrays,
so DeviceOps downloads the preprocessed f32 inputs and uploads the low-res masks; binding the device buffers
directly (ONNX Runtime IOBinding on device OrtValues, TensorRT ``set_tensor_address``), the SAM encoder on its own
stream and keeping the ``[SEG]`` hidden state on the device need device-pointer entry points in the backends,
which they do not have yet. ``buffer_plan`` already gives every buffer of the fully device-resident request.
None of DeviceOps has run on a GPU: its CPU tests drive it with stand-in CUDA kernels (tests/test_device_path.py),
and the GPU test (marked ``gpu``) is in benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


# ------------------------------------------------------------------------------------------------ bit packing
def packed_size(per_mask: int) -> int:
    """Bytes of one packed mask of ``per_mask`` pixels."""
    return (int(per_mask) + 7) // 8


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """bool/uint8 [N, H, W] -> uint8 [N, ceil(H*W/8)]: pixel i of a mask (row-major) is bit i % 8 (LSB first) of
    byte i // 8 — the layout ``ops.pack_masks_cuda`` writes on the device."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {masks.shape}")
    flat = masks.reshape(masks.shape[0], masks.shape[1] * masks.shape[2]) != 0
    return np.packbits(flat, axis=1, bitorder="little")


def unpack_masks(packed: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [N, ceil(H*W/8)] -> bool [N, H, W] (inverse of ``pack_masks``)."""
    packed = np.asarray(packed, dtype=np.uint8)
    per = int(height) * int(width)
    if packed.ndim != 2 or packed.shape[1] != packed_size(per):
        raise ValueError(
            f"packed masks {packed.shape}: expected [N, {packed_size(per)}] for {height}x{width}"
        )
    bits = np.unpackbits(packed, axis=1, count=per, bitorder="little")
    return bits.reshape(packed.shape[0], height, width).view(bool)


# -------------------------------------------------------------------------------------------- buffer sizes
@dataclass(frozen=True)
class BufferSpec:
    shape: tuple[int, ...]
    dtype: str
    side: str  # "device" (never copied back) | "to_host" (copied back per request)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def buffer_plan(manifest, image_hw: tuple[int, int], num_masks: int) -> dict[str, BufferSpec]:
    """Every buffer of one device-resident request for a picture of ``image_hw`` with ``num_masks`` [SEG]."""
    H, W = (int(v) for v in image_hw)
    n = int(num_masks)
    m = manifest.model
    clip, sam = manifest.preprocess.clip.size, manifest.preprocess.sam.size
    eh, ew = m.sam_embedding_hw
    lh, lw = m.low_res_hw
    dev, host = "device", "to_host"
    return {
        "rgb": BufferSpec((H, W, 3), "uint8", dev),
        "clip_pixels": BufferSpec((1, 3, clip, clip), "float32", dev),
        "sam_pixels": BufferSpec((1, 3, sam, sam), "float32", dev),
        "sam_embedding": BufferSpec((1, m.sam_embed_dim, eh, ew), "float32", dev),
        "seg_hidden": BufferSpec((n, m.hidden_size), "float32", dev),
        "low_res": BufferSpec((n, lh, lw), "float32", dev),
        "masks": BufferSpec((n, H, W), "uint8", dev),
        "union": BufferSpec((H, W), "uint8", dev),
        "packed_masks": BufferSpec((n, packed_size(H * W)), "uint8", host),
        "packed_union": BufferSpec((1, packed_size(H * W)), "uint8", host),
        "bboxes": BufferSpec((n, 4), "int64", host),
        "areas": BufferSpec((n,), "int64", host),
    }


def host_return_bytes(plan: dict[str, BufferSpec]) -> int:
    """Bytes copied back to the host per request (packed masks + union, boxes, areas)."""
    return sum(b.nbytes for b in plan.values() if b.side == "to_host")


# ----------------------------------------------------------------------------------------------- path choice
@dataclass(frozen=True)
class PathChoice:
    kind: str  # "device" | "host"
    reason: str


def choose_path(
    backend_name: str, providers: list[str], *, cuda_kernels: bool, cuda_python: bool
) -> PathChoice:
    """Where pre/post-processing run: on the device when the graphs do and the kernels can, else on the host."""
    on_gpu = backend_name == "tensorrt" or bool(providers and providers[0] in GPU_PROVIDERS)
    if not on_gpu:
        return PathChoice(
            "host", f"the graphs run on the CPU ({providers[0] if providers else backend_name})"
        )
    if not cuda_kernels:
        return PathChoice(
            "host", "legion_rt._C has no usable CUDA kernels (built without CUDA, or no device)"
        )
    if not cuda_python:
        return PathChoice("host", "cuda-python is not installed (device buffers need it)")
    return PathChoice("device", f"graphs on the GPU ({backend_name}), CUDA kernels available")


def select_ops(backend, ops_module=None) -> tuple[Any, PathChoice]:
    """(the object the Engine calls ``preprocess`` / ``postprocess_masks`` on, the choice made)."""
    if ops_module is None:
        from . import ops as ops_module
    providers = list(getattr(backend, "providers", []) or [])
    name = getattr(backend, "name", "")
    on_gpu = name == "tensorrt" or bool(providers and providers[0] in GPU_PROVIDERS)
    cuda_python = False
    cuda_kernels = False
    if on_gpu:  # no CUDA call and no cuda-python import on the CPU path
        cuda_kernels = ops_module.cuda_available()
        try:
            from .backends.cuda_rt import import_cudart

            import_cudart()
            cuda_python = True
        except Exception:
            cuda_python = False
    choice = choose_path(name, providers, cuda_kernels=cuda_kernels, cuda_python=cuda_python)
    if choice.kind == "host":
        return ops_module, choice
    from .backends.cuda_rt import CudaRuntime

    return DeviceOps(CudaRuntime(), ops_module), choice


# ------------------------------------------------------------------------------------------------ DeviceOps
class _State:
    def __init__(self, stream):
        self.stream = stream
        self.buffers: dict[str, list[int]] = {}


class DeviceOps:
    """``preprocess`` / ``postprocess_masks`` with the signatures of legion_rt.ops, run by the CUDA kernels.
    One stream and grow-only device buffers per calling thread (requests run on several threads); ``kernels``
    provides ``preprocess_cuda`` / ``postprocess_masks_cuda`` / ``pack_masks_cuda`` (legion_rt.ops)."""

    def __init__(self, cuda, kernels):
        self.cuda, self.kernels = cuda, kernels
        self._local = threading.local()
        self._states: list[_State] = []
        self._lock = threading.Lock()

    def __getattr__(
        self, name
    ):  # everything else (cuda_available, preprocess_geometry...) from legion_rt.ops
        return getattr(self.kernels, name)

    def _state(self) -> _State:
        st = getattr(self._local, "state", None)
        if st is None:
            st = self._local.state = _State(self.cuda.stream_create())
            with self._lock:
                self._states.append(st)
        return st

    def _buffer(self, st: _State, name: str, nbytes: int) -> int:
        buf = st.buffers.get(name)
        if buf is None or buf[1] < nbytes:
            if buf is not None:
                self.cuda.free(buf[0], st.stream)
            size = max(int(nbytes), 1)
            buf = st.buffers[name] = [self.cuda.malloc(size, st.stream), size]
        return buf[0]

    def preprocess(self, rgb: np.ndarray, *, num_threads=None, pillow_order: str = "auto", **kw):
        """uint8 [H, W, 3] -> (clip f32 [1, 3, c, c], sam f32 [1, 3, S, S], (h', w')), computed on the device."""
        del num_threads  # the CPU kernels' thread count
        rgb = np.ascontiguousarray(rgb)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            return self.kernels.preprocess(
                rgb, pillow_order=pillow_order, **kw
            )  # the CPU path names the error
        st, cuda = self._state(), self.cuda
        crop = tuple(kw.get("clip_crop", (336, 336)))
        sam_size = int(kw.get("sam_size", 1024))
        clip = np.empty((1, 3, *crop), np.float32)
        sam = np.empty((1, 3, sam_size, sam_size), np.float32)
        src = self._buffer(st, "rgb", rgb.nbytes)
        clip_d = self._buffer(st, "clip", clip.nbytes)
        sam_d = self._buffer(st, "sam", sam.nbytes)
        cuda.copy_h2d_async(src, rgb.ctypes.data, rgb.nbytes, st.stream)
        resized = self.kernels.preprocess_cuda(src, rgb.shape[:2], clip_d, sam_d, st.stream,
                                               pillow_order=pillow_order, **kw)  # fmt: skip
        # The backends take host arrays today: the device-resident form binds clip_d / sam_d instead.
        cuda.copy_d2h_async(clip.ctypes.data, clip_d, clip.nbytes, st.stream)
        cuda.copy_d2h_async(sam.ctypes.data, sam_d, sam.nbytes, st.stream)
        cuda.synchronize(st.stream)
        return clip, sam, (int(resized[0]), int(resized[1]))

    def postprocess_masks(self, low_res: np.ndarray, input_size, original_size, with_stats: bool = False, *,
                          image_size: int = 1024, num_threads=None):  # fmt: skip
        """float32 [N, h, w] -> bool [N, H, W] (+ union, bboxes, areas): post-processed and bit-packed on the device;
        only the packed masks, boxes and areas are copied back."""
        del num_threads
        low = np.ascontiguousarray(low_res, dtype=np.float32)
        if low.ndim != 3 or low.shape[0] == 0:
            return self.kernels.postprocess_masks(
                low, input_size, original_size, with_stats, image_size=image_size
            )
        n = low.shape[0]
        H, W = (int(v) for v in original_size)
        per = H * W
        st, cuda = self._state(), self.cuda
        low_d = self._buffer(st, "low_res", low.nbytes)
        masks_d = self._buffer(st, "masks", n * per)
        union_d = self._buffer(st, "union", per)
        boxes_d = self._buffer(st, "bboxes", n * 32)
        areas_d = self._buffer(st, "areas", n * 8)
        packed_d = self._buffer(st, "packed", (n + 1) * packed_size(per))
        cuda.copy_h2d_async(low_d, low.ctypes.data, low.nbytes, st.stream)
        self.kernels.postprocess_masks_cuda(low_d, low.shape, tuple(input_size), (H, W), masks_d, union_d, boxes_d,
                                            areas_d, st.stream, image_size=image_size)  # fmt: skip
        self.kernels.pack_masks_cuda(masks_d, n, per, packed_d, st.stream)
        self.kernels.pack_masks_cuda(union_d, 1, per, packed_d + n * packed_size(per), st.stream)
        packed = np.empty((n + 1, packed_size(per)), np.uint8)
        boxes = np.empty((n, 4), np.int64)
        areas = np.empty((n,), np.int64)
        cuda.copy_d2h_async(packed.ctypes.data, packed_d, packed.nbytes, st.stream)
        cuda.copy_d2h_async(boxes.ctypes.data, boxes_d, boxes.nbytes, st.stream)
        cuda.copy_d2h_async(areas.ctypes.data, areas_d, areas.nbytes, st.stream)
        cuda.synchronize(st.stream)
        masks = unpack_masks(packed[:n], H, W)
        if not with_stats:
            return masks
        return masks, unpack_masks(packed[n:], H, W)[0], boxes, areas

    def close(self) -> None:
        with self._lock:
            states, self._states = self._states, []
        for st in states:
            self.cuda.synchronize(st.stream)
            for ptr, _size in st.buffers.values():
                self.cuda.free(ptr, st.stream)
            st.buffers.clear()
