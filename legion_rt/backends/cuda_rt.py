"""CUDA runtime calls through cuda-python, shared by the TensorRT backend and the LLM runner's device KV cache.

Nothing here touches CUDA at import: ``CudaRuntime()`` imports cuda-python on first use, and every device query
happens on the first call that needs it.

* Import paths: ``cuda.bindings.runtime`` (cuda-python >= 12.6, the ``cuda-bindings`` package) and the older
  ``cuda.cudart`` (cuda-python < 12.6; removed in 13). cuda-python's major version must match the driver's CUDA
  generation (``nvidia-smi`` shows "CUDA Version"): 12.x for CUDA 12 drivers, 13.x for CUDA 13 drivers — the
  extras ``legion_rt[cuda12]`` / ``legion_rt[cuda13]`` pin that range. A newer cuda-python than the driver fails
  every call with cudaErrorInsufficientDriver.
* Errors: cuda-python calls return ``(err, *values)``; ``CudaRuntime.check`` turns a nonzero ``err`` into a
  ``BackendError`` naming the call, the error (cudaGetErrorName / cudaGetErrorString) and what to do for the common
  ones (no device, driver too old, out of memory).
* Memory: stream-ordered ``cudaMallocAsync`` / ``cudaFreeAsync`` where the device supports memory pools (checked
  once per device: ``cudaDevAttrMemoryPoolsSupported``; some virtualized GPUs do not), plain ``cudaMalloc`` /
  ``cudaFree`` otherwise.
* KV-cache prefix copies: ``prefix_copy_geometry`` + ``CudaRuntime.copy_prefix_2d`` copy the first ``n`` positions
  of a [B, KVH, MAX, D] buffer into another one of a different capacity with ONE ``cudaMemcpy2DAsync`` (a row per
  (batch, head): ``n * D`` contiguous elements; the rows lie ``MAX * D`` elements apart).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..errors import BackendError

INSTALL_HINT = (
    "pip install 'legion_rt[cuda12]' for a CUDA 12 driver or 'legion_rt[cuda13]' for a CUDA 13 driver "
    "(nvidia-smi shows the driver's CUDA version)"
)

# What to do about the errors people actually meet (cudaError_t names, as cudaGetErrorName returns them).
HINTS = {
    "cudaErrorNoDevice": "no CUDA device is visible: check `nvidia-smi` and CUDA_VISIBLE_DEVICES, or use "
    "--backend onnxruntime on the CPU",
    "cudaErrorInsufficientDriver": "no NVIDIA driver is loaded, or it is older than the CUDA version of "
    "cuda-python / the CUDA libraries: install the cuda-python major version that matches the driver ("
    + INSTALL_HINT
    + ") or update the driver",
    "cudaErrorSystemDriverMismatch": "the NVIDIA kernel module and the user-space driver differ (a driver update "
    "without a reboot?): reboot or reinstall the driver",
    "cudaErrorMemoryAllocation": "out of GPU memory: lower max_concurrency / max_new_tokens, or free the GPU "
    "(`nvidia-smi` lists the processes using it)",
    "cudaErrorDevicesUnavailable": "the GPU is busy or in exclusive-process mode and taken by another process "
    "(`nvidia-smi`)",
    "cudaErrorInvalidDevice": "the device id does not exist here: check CUDA_VISIBLE_DEVICES and the device_id "
    "option",
    "cudaErrorNotSupported": "this GPU or its virtualization layer does not support the operation",
}

ERROR_NUMBERS = {  # fallbacks when the bindings cannot name an error (values of the CUDA runtime's cudaError_t)
    2: "cudaErrorMemoryAllocation",
    35: "cudaErrorInsufficientDriver",
    46: "cudaErrorDevicesUnavailable",
    100: "cudaErrorNoDevice",
    101: "cudaErrorInvalidDevice",
    801: "cudaErrorNotSupported",
    803: "cudaErrorSystemDriverMismatch",
}


def import_cudart():
    """cuda-python's runtime module: ``cuda.bindings.runtime`` (>= 12.6) or ``cuda.cudart`` (older)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            raise BackendError(f"cuda-python is not installed: {INSTALL_HINT}") from None
    return cudart


def _text(value) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return None if value is None else str(value)


@dataclass(frozen=True)
class Copy2D:
    """Arguments of one cudaMemcpy2D(Async): ``height`` rows of ``width`` bytes, rows ``spitch`` bytes apart in
    the source and ``dpitch`` bytes apart in the destination."""

    dpitch: int
    spitch: int
    width: int
    height: int


def prefix_copy_geometry(
    shape_src: tuple[int, ...], shape_dst: tuple[int, ...], n: int, itemsize: int
) -> Copy2D | None:
    """The 2D copy of positions [0, n) of a KV buffer ``shape_src`` = [B, KVH, MAX_src, D] into ``shape_dst`` =
    [B, KVH, MAX_dst, D] (both C-contiguous). None when there is nothing to copy (n == 0)."""
    b, h, max_src, d = (int(x) for x in shape_src)
    b2, h2, max_dst, d2 = (int(x) for x in shape_dst)
    if (b, h, d) != (b2, h2, d2):
        raise ValueError(
            f"KV buffers {tuple(shape_src)} and {tuple(shape_dst)} differ in batch, heads or size"
        )
    if not 0 <= n <= min(max_src, max_dst):
        raise ValueError(f"prefix of {n} positions does not fit in {max_src} / {max_dst}")
    if n == 0:
        return None
    return Copy2D(
        dpitch=max_dst * d * itemsize, spitch=max_src * d * itemsize, width=n * d * itemsize, height=b * h
    )


class CudaRuntime:
    """A thin, checked layer over cuda-python's runtime module ``cudart`` (imported when None is given)."""

    def __init__(self, cudart=None):
        self.rt = cudart if cudart is not None else import_cudart()
        self._pools: dict[int, bool] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------ errors
    def describe(self, err) -> str:
        """'cudaErrorNoDevice (100): no CUDA-capable device is detected' plus a hint when there is one."""
        code = int(err)
        name = text = None
        try:
            status, value = self.rt.cudaGetErrorName(err)
            name = _text(value) if int(status) == 0 else None
            status, value = self.rt.cudaGetErrorString(err)
            text = _text(value) if int(status) == 0 else None
        except Exception:  # a stand-in or a half-broken install: fall back to what we know
            pass
        if not name or name.startswith("unrecognized"):
            enum_name = getattr(err, "name", None)
            name = enum_name if isinstance(enum_name, str) else ERROR_NUMBERS.get(code, "CUDA error")
        msg = f"{name} ({code})" + (f": {text}" if text and text != name else "")
        hint = HINTS.get(name)
        return f"{msg}; {hint}" if hint else msg

    def check(self, result, what: str = "CUDA call"):
        """cuda-python calls return ``(err, *values)``: raise BackendError on an error, else return the value
        (one), a tuple of values (several) or None (none)."""
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise BackendError(f"{what} failed: {self.describe(err)}")
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else tuple(rest)

    # ------------------------------------------------------------------------------------------------ memory
    def current_device(self) -> int:
        return int(self.check(self.rt.cudaGetDevice(), "cudaGetDevice"))

    def memory_pools_supported(self, device: int) -> bool:
        """Whether ``device`` supports stream-ordered allocation (cudaMallocAsync). Asked once per device."""
        with self._lock:
            if device not in self._pools:
                attr = self.rt.cudaDeviceAttr.cudaDevAttrMemoryPoolsSupported
                value = self.check(self.rt.cudaDeviceGetAttribute(attr, device), "cudaDeviceGetAttribute")
                self._pools[device] = bool(value)
            return self._pools[device]

    def malloc(self, nbytes: int, stream=0, device: int | None = None) -> int:
        """Device memory of ``nbytes`` (at least 1): cudaMallocAsync on ``stream`` where memory pools are
        supported, cudaMalloc otherwise. Free it with ``free`` (same stream, same device)."""
        device = self.current_device() if device is None else device
        nbytes = max(int(nbytes), 1)
        if self.memory_pools_supported(device):
            return int(self.check(self.rt.cudaMallocAsync(nbytes, stream), f"cudaMallocAsync({nbytes})"))
        return int(self.check(self.rt.cudaMalloc(nbytes), f"cudaMalloc({nbytes})"))

    def free(self, ptr: int, stream=0, device: int | None = None) -> None:
        device = self.current_device() if device is None else device
        if self.memory_pools_supported(device):
            self.check(self.rt.cudaFreeAsync(ptr, stream), "cudaFreeAsync")
        else:
            self.check(self.rt.cudaFree(ptr), "cudaFree")

    def memset_async(self, ptr: int, nbytes: int, stream, value: int = 0) -> None:
        self.check(self.rt.cudaMemsetAsync(ptr, value, int(nbytes), stream), "cudaMemsetAsync")

    def copy_h2d_async(self, dst: int, src_host: int, nbytes: int, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.check(self.rt.cudaMemcpyAsync(dst, src_host, int(nbytes), kind, stream), "cudaMemcpyAsync (H2D)")

    def copy_d2h_async(self, dst_host: int, src: int, nbytes: int, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.check(self.rt.cudaMemcpyAsync(dst_host, src, int(nbytes), kind, stream), "cudaMemcpyAsync (D2H)")

    def copy_d2d_async(self, dst: int, src: int, nbytes: int, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self.check(self.rt.cudaMemcpyAsync(dst, src, int(nbytes), kind, stream), "cudaMemcpyAsync (D2D)")

    def copy_prefix_2d(self, dst: int, src: int, geometry: Copy2D | None, stream) -> None:
        """Device-to-device copy of a KV prefix (``prefix_copy_geometry``): one cudaMemcpy2DAsync."""
        if geometry is None:
            return
        g = geometry
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self.check(
            self.rt.cudaMemcpy2DAsync(dst, g.dpitch, src, g.spitch, g.width, g.height, kind, stream),
            "cudaMemcpy2DAsync (KV prefix)",
        )

    # ------------------------------------------------------------------------------------------------ streams
    def stream_create(self):
        return self.check(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def synchronize(self, stream) -> None:
        self.check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def set_device(self, device: int) -> None:
        """cuda-python calls act on the calling thread's current device; worker threads set it first."""
        self.check(self.rt.cudaSetDevice(int(device)), f"cudaSetDevice({device})")

    # ------------------------------------------------------------------------------------------------- events
    # Cross-stream order without a host wait: the producer records an event on its stream, the consumer's stream
    # waits for it (cudaStreamWaitEvent); timing is disabled (cheaper, and never read).
    def event_create(self):
        # cudaEventDisableTiming = 0x02 in the CUDA headers (older bindings may not export the name)
        flags = getattr(self.rt, "cudaEventDisableTiming", 2)
        return self.check(self.rt.cudaEventCreateWithFlags(flags), "cudaEventCreateWithFlags")

    def event_record(self, event, stream) -> None:
        self.check(self.rt.cudaEventRecord(event, stream), "cudaEventRecord")

    def stream_wait_event(self, stream, event) -> None:
        self.check(self.rt.cudaStreamWaitEvent(stream, event, 0), "cudaStreamWaitEvent")

    def event_synchronize(self, event) -> None:
        self.check(self.rt.cudaEventSynchronize(event), "cudaEventSynchronize")

    def event_destroy(self, event) -> None:
        self.check(self.rt.cudaEventDestroy(event), "cudaEventDestroy")
