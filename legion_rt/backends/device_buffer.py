"""Device buffers that the graphs read and write directly: what the ONNX Runtime backend binds through
``IOBinding.bind_input`` / ``bind_output`` (``device_type="cuda"``, ``buffer_ptr``) and the TensorRT backend through
``IExecutionContext.set_tensor_address``.

A ``DeviceBuffer`` is a description (pointer, shape, dtype, device id), not an owner: the memory belongs to a
``DeviceBufferPool`` (cuda_rt allocations reused across requests), to a per-thread scratch area of
legion_rt/device_path.py, or to an ONNX Runtime ``OrtValue`` kept alive in ``owner``. Nothing here calls CUDA at
import; the pool calls cuda_rt only when asked for memory.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import BackendError


@dataclass(frozen=True)
class DeviceBuffer:
    """``shape`` elements of ``dtype`` at device address ``ptr`` on CUDA device ``device_id`` (C-contiguous).
    ``name`` is for messages; ``owner`` keeps memory that is not ours alive (an OrtValue) and is never used."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    device_id: int = 0
    name: str = ""
    owner: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if any(d < 0 for d in self.shape):
            raise BackendError(
                f"device buffer {self.name or hex(self.ptr)}: negative dimension in {self.shape}"
            )

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def row(self, index: int) -> DeviceBuffer:
        """Row ``index`` of the leading dimension as a [1, *rest] buffer (same memory): one [SEG] of a batch."""
        n = self.shape[0] if self.shape else 0
        if not 0 <= int(index) < n:
            raise BackendError(f"device buffer {self.name}: row {index} outside 0..{n - 1} of {self.shape}")
        per = math.prod(self.shape[1:]) * self.dtype.itemsize
        return DeviceBuffer(self.ptr + int(index) * per, (1, *self.shape[1:]), self.dtype, self.device_id,
                            f"{self.name}[{index}]", self.owner)  # fmt: skip

    def expect(self, shape: tuple[int, ...], dtype, what: str) -> DeviceBuffer:
        """This buffer when it has ``shape`` and ``dtype``; else BackendError naming ``what`` and both."""
        want = tuple(int(d) for d in shape)
        if self.shape != want or self.dtype != np.dtype(dtype):
            raise BackendError(
                f"{what}: device buffer {self.name or hex(self.ptr)} is {self.dtype} {list(self.shape)}, "
                f"expected {np.dtype(dtype)} {list(want)}"
            )
        return self

    @classmethod
    def from_ortvalue(cls, value, shape, dtype, device_id: int = 0, name: str = "") -> DeviceBuffer:
        """An ONNX Runtime OrtValue on a CUDA device (``data_ptr()``), kept alive by the buffer."""
        return cls(int(value.data_ptr()), tuple(shape), np.dtype(dtype), int(device_id), name, owner=value)


class DeviceBufferPool:
    """Device memory reused across requests: ``take(name, shape, dtype, stream)`` gives a buffer of at least that
    size (a free block of that name, else a new allocation through cuda_rt), ``give(buf)`` returns it once no
    stream uses it any more (the caller synchronizes first), ``close()`` frees every block. Thread-safe."""

    def __init__(self, cuda, device_id: int = 0):
        self.cuda, self.device_id = cuda, int(device_id)
        self._free: dict[str, list[tuple[int, int]]] = {}  # name -> [(ptr, capacity)]
        self._capacity: dict[int, int] = {}  # every block allocated and not freed: ptr -> capacity
        self._lock = threading.Lock()

    def take(self, name: str, shape, dtype, stream=0) -> DeviceBuffer:
        nbytes = max(math.prod(int(d) for d in shape) * np.dtype(dtype).itemsize, 1)
        with self._lock:
            blocks = self._free.get(name, [])
            fits = [b for b in blocks if b[1] >= nbytes]
            if fits:
                block = min(fits, key=lambda b: b[1])
                blocks.remove(block)
                return DeviceBuffer(block[0], tuple(shape), dtype, self.device_id, name)
        ptr = int(self.cuda.malloc(nbytes, stream))
        with self._lock:
            self._capacity[ptr] = nbytes
        return DeviceBuffer(ptr, tuple(shape), dtype, self.device_id, name)

    def give(self, buf: DeviceBuffer) -> None:
        with self._lock:
            cap = self._capacity.get(buf.ptr)
            if cap is None:
                raise BackendError(f"device buffer {buf.name} at {hex(buf.ptr)} was not taken from this pool")
            self._free.setdefault(buf.name, []).append((buf.ptr, cap))

    @property
    def allocated_bytes(self) -> int:
        with self._lock:
            return sum(self._capacity.values())

    def close(self, stream=0) -> None:
        with self._lock:
            ptrs, self._capacity, self._free = list(self._capacity), {}, {}
        for ptr in ptrs:
            self.cuda.free(ptr, stream)
