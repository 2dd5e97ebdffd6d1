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

Device-resident requests (``DevicePath``, chosen by ``select_ops`` when the backend takes device buffers,
``backend.device_io``): the vision and SAM graphs are bound to the buffers ``preprocess_cuda`` wrote (ONNX Runtime
IOBinding ``bind_input(..., buffer_ptr=...)``, TensorRT ``set_tensor_address``), the SAM embedding stays a device
buffer bound as the mask head's input, the SAM encoder runs on the SAM thread's own stream and records an event the
mask thread's stream waits on, a [SEG] hidden state is copied device to device into the mask head's input when the
LLM runs on a GPU provider (``OrtLLM.keep_hidden_on_device``; a host array from the CPU provider or the TensorRT
LLM engine is uploaded), and the mask head writes its low-res masks into the buffer ``postprocess_masks_cuda``
reads. Still host arrays: the vision graph's image embeds (the LLM's input embeddings are host arrays) and
``DeviceOps.preprocess`` / ``postprocess_masks`` for callers outside a request (classify, watch).
None of this has run on a GPU: the CPU tests drive it with stand-in CUDA kernels, sessions and engines
(tests/test_device_path.py, tests/test_device_resident.py); the GPU tests (marked ``gpu``) are in
benchmarks/gpu_check.sh.
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
    """``kind``: where pre/post-processing run ("device" | "host"). ``resident``: the graphs read and write the
    device buffers directly (no host round trip of pixels, SAM embedding or low-res masks). ``seg_hidden``: where
    a [SEG] hidden state goes to the mask head from ("device": copied device to device; "host": uploaded)."""

    kind: str
    reason: str
    resident: bool = False
    seg_hidden: str = "host"


def graphs_on_gpu(backend_name: str, providers: list[str]) -> bool:
    return backend_name == "tensorrt" or bool(providers and providers[0] in GPU_PROVIDERS)


def choose_path(
    backend_name: str,
    providers: list[str],
    *,
    cuda_kernels: bool,
    cuda_python: bool,
    device_io: bool = False,
    llm_hidden_on_device: bool = False,
) -> PathChoice:
    """Where pre/post-processing run: on the device when the graphs do and the kernels can, else on the host.
    ``device_io``: the backend takes device buffers as graph inputs/outputs (backend.device_io);
    ``llm_hidden_on_device``: the LLM can leave its hidden state on the device (an ONNX Runtime LLM session on
    the CUDA / TensorRT provider; the CPU provider and the TensorRT LLM engine return host arrays)."""
    if not graphs_on_gpu(backend_name, providers):
        return PathChoice(
            "host", f"the graphs run on the CPU ({providers[0] if providers else backend_name})"
        )
    if not cuda_kernels:
        return PathChoice(
            "host", "legion_rt._C has no usable CUDA kernels (built without CUDA, or no device)"
        )
    if not cuda_python:
        return PathChoice("host", "cuda-python is not installed (device buffers need it)")
    why = f"graphs on the GPU ({backend_name}), CUDA kernels available"
    if not device_io:
        return PathChoice("device", why + "; the backend takes host arrays (pixels and masks cross the bus)")
    seg = "device" if llm_hidden_on_device else "host"
    llm = "on the device" if seg == "device" else "uploaded from the LLM's host output"
    return PathChoice("device", f"{why}; graphs bound to device buffers, [SEG] hidden state {llm}", True, seg)


def select_ops(backend, ops_module=None, manifest=None) -> tuple[Any, PathChoice]:
    """(the object the Engine calls ``preprocess`` / ``postprocess_masks`` on, the choice made). The one place
    that looks at the providers in use: with ``manifest`` given and a backend that takes device buffers the
    object is a ``DevicePath`` (requests run device-resident), and the LLM is told to keep its hidden state on
    the device when it can."""
    if ops_module is None:
        from . import ops as ops_module
    providers = list(getattr(backend, "providers", []) or [])
    name = getattr(backend, "name", "")
    on_gpu = graphs_on_gpu(name, providers)
    cuda_python = False
    cuda_kernels = False
    device_io = llm_device = False
    if on_gpu:  # no CUDA call and no cuda-python import on the CPU path
        cuda_kernels = ops_module.cuda_available()
        try:
            from .backends.cuda_rt import import_cudart

            import_cudart()
            cuda_python = True
        except Exception:
            cuda_python = False
        device_io = manifest is not None and bool(getattr(backend, "device_io", False))
        llm_device = bool(getattr(getattr(backend, "llm", None), "can_keep_hidden_on_device", False))
    choice = choose_path(name, providers, cuda_kernels=cuda_kernels, cuda_python=cuda_python,
                         device_io=device_io, llm_hidden_on_device=llm_device)  # fmt: skip
    if choice.kind == "host":
        return ops_module, choice
    from .backends.cuda_rt import CudaRuntime

    if not choice.resident:
        return DeviceOps(CudaRuntime(), ops_module), choice
    if choice.seg_hidden == "device":
        backend.llm.keep_hidden_on_device()
    device_id = int(getattr(backend, "device_id", 0))
    return DevicePath(CudaRuntime(), ops_module, manifest, device_id=device_id), choice


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
        # A backend without device I/O takes host arrays: DevicePath.start_request keeps these on the device.
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
        st, cuda = self._state(), self.cuda
        low_d = self._buffer(st, "low_res", low.nbytes)
        cuda.copy_h2d_async(low_d, low.ctypes.data, low.nbytes, st.stream)
        return self._post_device(st, low_d, low.shape, input_size, original_size, with_stats, image_size)

    def _post_device(self, st: _State, low_d: int, shape, input_size, original_size, with_stats: bool,
                     image_size: int):  # fmt: skip
        """f32 [N, h, w] at device address ``low_d`` (ready in ``st.stream`` order) -> the masks, post-processed
        and bit-packed on the device; only the packed masks + union, boxes and areas are copied back."""
        n = int(shape[0])
        H, W = (int(v) for v in original_size)
        per = H * W
        cuda = self.cuda
        masks_d = self._buffer(st, "masks", n * per)
        union_d = self._buffer(st, "union", per)
        boxes_d = self._buffer(st, "bboxes", n * 32)
        areas_d = self._buffer(st, "areas", n * 8)
        packed_d = self._buffer(st, "packed", (n + 1) * packed_size(per))
        self.kernels.postprocess_masks_cuda(low_d, tuple(int(v) for v in shape), tuple(input_size), (H, W), masks_d,
                                            union_d, boxes_d, areas_d, st.stream, image_size=image_size)  # fmt: skip
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


# ------------------------------------------------------------------------------------------ DevicePath
class RequestDevice:
    """The device side of one request: its SAM pixels and SAM embedding (taken from the pool: the SAM job and the
    mask jobs read them from other threads), the CLIP pixels (the request thread's scratch: the vision graph reads
    them on that thread), and two events — ``pixels_ready`` (preprocess done, on the request stream) and
    ``sam_ready`` (embedding written, on the SAM stream).

    Reference-counted: the request holds one reference, the SAM job and every mask job one each while queued or
    running (Future done-callbacks drop them, cancelled or not); the last ``release`` waits for the device work
    on these buffers and gives them back to the pool."""

    def __init__(
        self, path: DevicePath, stream, clip, sam_pixels, embedding, resized, pixels_ready, sam_ready
    ):
        self.path, self.stream = path, stream
        self.clip, self.sam_pixels, self.embedding = clip, sam_pixels, embedding
        self.resized = resized
        self.pixels_ready, self.sam_ready = pixels_ready, sam_ready
        self.sam_recorded = False
        self._refs = 1
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            if self._refs <= 0:
                raise RuntimeError("RequestDevice used after its last release")
            self._refs += 1

    def release(self, *_future) -> None:  # also a Future done-callback
        with self._lock:
            self._refs -= 1
            last = self._refs == 0
        if last:
            self.path._finish_request(self)


class DevicePath(DeviceOps):
    """The device-resident request (issue 11): DeviceOps plus the stages that hand device buffers to the backend.

    * ``start_request``: the picture is uploaded once (uint8) and ``preprocess_cuda`` writes the CLIP pixels
      [1, 3, c, c] and the SAM pixels [1, 3, S, S] into the buffers the vision and SAM graphs are bound to;
    * ``vision``: the vision graph reads the CLIP buffer; its image embeds [1, 576, H] come back (the LLM's
      embedding input is a host array);
    * ``sam_encoder``: on the calling thread's own stream (the SAM pool thread: never the decode's), after
      ``pixels_ready``; writes the embedding [1, C, h, w] into its device buffer and records ``sam_ready``;
    * ``masks``: the mask thread's stream waits for ``sam_ready``; each [SEG] hidden state [1, H] is copied
      device to device (or uploaded, when the LLM returned a host array) into the mask head's seg_hidden buffer;
      the mask head writes low-res masks [N, 256, 256] into a device buffer read by ``postprocess_masks_cuda`` +
      ``pack_masks_cuda``; only packed masks, boxes and areas come back.

    Stream order with the backends: a TensorRT backend enqueues on the stream it is given
    (``backend.runs_on_caller_stream``); ONNX Runtime runs on its own stream per session and returns when its
    outputs are written, so before an ONNX Runtime graph reads a buffer the producing stream is synchronized."""

    def __init__(self, cuda, kernels, manifest, *, device_id: int = 0):
        super().__init__(cuda, kernels)
        from .backends.device_buffer import DeviceBufferPool

        m = manifest.model
        self.device_id = int(device_id)
        self.hidden_size = int(m.hidden_size)
        eh, ew = (int(v) for v in m.sam_embedding_hw)
        self.embedding_shape = (1, int(m.sam_embed_dim), eh, ew)  # [1, C, h, w]
        self.low_res_hw = tuple(int(v) for v in m.low_res_hw)  # (256, 256)
        self.pool = DeviceBufferPool(cuda, self.device_id)

    def _state(self) -> _State:
        st = getattr(self._local, "state", None)
        if st is None:  # a new thread: its current device is 0 until set
            self.cuda.set_device(self.device_id)
        return super()._state()

    def _scratch(self, st: _State, name: str, shape, dtype):
        from .backends.device_buffer import DeviceBuffer

        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return DeviceBuffer(self._buffer(st, name, nbytes), tuple(shape), dtype, self.device_id, name)

    def _ready_for(self, backend, stream) -> None:
        """Work enqueued on ``stream`` must be done before ``backend`` reads: nothing to do for a backend that
        enqueues on that same stream; ONNX Runtime runs on its own stream, so wait here."""
        if not getattr(backend, "runs_on_caller_stream", False):
            self.cuda.synchronize(stream)

    # ------------------------------------------------------------------------------------------ the stages
    def start_request(
        self, rgb: np.ndarray, *, num_threads=None, pillow_order: str = "auto", **kw
    ) -> RequestDevice:
        """uint8 [H, W, 3] -> RequestDevice: CLIP and SAM pixels on the device, ``resized`` = SAM's (h', w')."""
        del num_threads
        rgb = np.ascontiguousarray(rgb)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            self.kernels.preprocess(rgb, pillow_order=pillow_order, **kw)  # raises the CPU path's ImageError
            from .errors import ImageError

            raise ImageError(f"rgb must be uint8 [H, W, 3], got {rgb.dtype} {list(rgb.shape)}")
        st, cuda = self._state(), self.cuda
        crop = tuple(int(v) for v in kw.get("clip_crop", (336, 336)))
        sam_size = int(kw.get("sam_size", 1024))
        clip = self._scratch(st, "clip", (1, 3, *crop), np.float32)
        sam = self.pool.take("sam_pixels", (1, 3, sam_size, sam_size), np.float32, st.stream)
        embedding = self.pool.take("sam_embedding", self.embedding_shape, np.float32, st.stream)
        src = self._buffer(st, "rgb", rgb.nbytes)
        cuda.copy_h2d_async(src, rgb.ctypes.data, rgb.nbytes, st.stream)
        resized = self.kernels.preprocess_cuda(src, rgb.shape[:2], clip.ptr, sam.ptr, st.stream,
                                               pillow_order=pillow_order, **kw)  # fmt: skip
        pixels_ready, sam_ready = cuda.event_create(), cuda.event_create()
        cuda.event_record(pixels_ready, st.stream)
        # the upload reads ``rgb`` asynchronously: the caller keeps it alive (Request.rgb) until release
        return RequestDevice(self, st.stream, clip, sam, embedding, (int(resized[0]), int(resized[1])),
                             pixels_ready, sam_ready)  # fmt: skip

    def vision(self, backend, rd: RequestDevice):
        """The vision graph on the CLIP buffer -> (image_embeds f32 [1, 576, H], cls_logits f32 [1, 2] | None),
        host arrays. Runs on the request thread (the CLIP buffer is its scratch)."""
        self._ready_for(backend, rd.stream)
        return backend.vision_device(rd.clip, rd.stream)

    def sam_encoder(self, backend, rd: RequestDevice):
        """SAM encoder on this thread's own stream -> (embedding DeviceBuffer [1, C, h, w], ``sam_ready``)."""
        st, cuda = self._state(), self.cuda
        cuda.stream_wait_event(st.stream, rd.pixels_ready)  # preprocess (request stream) before the encoder
        if not getattr(backend, "runs_on_caller_stream", False):
            cuda.event_synchronize(rd.pixels_ready)
        backend.sam_encoder_device(rd.sam_pixels, rd.embedding, st.stream)
        cuda.event_record(rd.sam_ready, st.stream)
        rd.sam_recorded = True
        return rd.embedding, rd.sam_ready

    def masks(self, backend, rd: RequestDevice, hiddens: list, input_size, original_size, check=None):
        """One mask-head call per [SEG] (N = 1, as on the host path) -> (masks bool [N, H, W], union bool [H, W],
        bboxes int64 [N, 4], areas int64 [N]). ``hiddens``: each [SEG]'s hidden state, a DeviceBuffer [1, H]
        (the LLM on the GPU: copied device to device) or a host f32 [H] (uploaded). ``check()`` runs before each
        mask-head call (the request's cancellation)."""
        st, cuda = self._state(), self.cuda
        n, H = len(hiddens), self.hidden_size
        cuda.stream_wait_event(st.stream, rd.sam_ready)  # the embedding (SAM stream) before the mask head
        seg = self._scratch(st, "seg_hidden", (n, H), np.float32)
        low = self._scratch(st, "low_res", (n, *self.low_res_hw), np.float32)
        hosts = []  # uploads read these asynchronously: alive until the stream is synchronized below
        for i, h in enumerate(hiddens):
            dst = seg.row(i)
            if hasattr(h, "ptr"):
                h.expect((1, H), np.float32, "[SEG] hidden state")
                cuda.copy_d2d_async(dst.ptr, h.ptr, dst.nbytes, st.stream)
            else:
                arr = np.ascontiguousarray(np.asarray(h, dtype=np.float32).reshape(1, H))
                hosts.append(arr)
                cuda.copy_h2d_async(dst.ptr, arr.ctypes.data, dst.nbytes, st.stream)
        if not getattr(backend, "runs_on_caller_stream", False):
            cuda.event_synchronize(rd.sam_ready)
        self._ready_for(backend, st.stream)
        for i in range(n):
            if check is not None:
                check()
            backend.mask_head_device(seg.row(i), rd.embedding, low.row(i), st.stream)
        # image_size: ops.postprocess_masks' default, as the host path (Request._drain_masks) passes none
        out = self._post_device(st, low.ptr, low.shape, input_size, original_size, True, 1024)
        del hosts
        return out

    def _finish_request(self, rd: RequestDevice) -> None:
        """Last reference gone: wait for the device work on this request's buffers, give them back, drop the
        events. May run on any thread (a Future callback)."""
        cuda = self.cuda
        cuda.set_device(self.device_id)
        if rd.sam_recorded:
            cuda.event_synchronize(rd.sam_ready)
        cuda.synchronize(rd.stream)
        self.pool.give(rd.sam_pixels)
        self.pool.give(rd.embedding)
        cuda.event_destroy(rd.pixels_ready)
        cuda.event_destroy(rd.sam_ready)

    def close(self) -> None:
        super().close()
        self.pool.close()
