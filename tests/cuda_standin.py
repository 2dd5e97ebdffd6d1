"""Stand-ins for cuda-python's runtime module and for ``tensorrt``, for tests on machines without a GPU.

``FakeCudart`` has the call shapes of ``cuda.bindings.runtime`` (every call returns ``(err, *values)``) and records
every call in ``calls``. Its "device memory" is host memory: pointers are real host addresses, so the copies
(cudaMemcpyAsync, cudaMemcpy2DAsync with its documented pitch/width/height semantics) and cudaMemsetAsync really
move bytes, and a test can check what landed where. ``FakeTrt`` is a ``tensorrt`` module object with the calls
legion_rt/backends/tensorrt.py makes; its engines compute ``output = 2 * input`` (in the output's dtype) so the
whole path host -> device -> engine -> host is checked.
"""

from __future__ import annotations

import ctypes
import enum
import types

import numpy as np


class FakeError(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorNotSupported = 801


ERROR_STRINGS = {
    2: b"out of memory",
    35: b"CUDA driver version is insufficient for CUDA runtime version",
    100: b"no CUDA-capable device is detected",
    801: b"operation not supported",
}


class FakeCudart:
    """``cuda.bindings.runtime`` stand-in. ``pools``: cudaDevAttrMemoryPoolsSupported; ``fail``: call name ->
    error code returned by that call."""

    cudaError_t = FakeError
    cudaDeviceAttr = types.SimpleNamespace(cudaDevAttrMemoryPoolsSupported=115)
    cudaMemcpyKind = types.SimpleNamespace(
        cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3
    )

    def __init__(self, *, pools: bool = True, fail: dict | None = None):
        self.pools = pools
        self.fail = dict(fail or {})
        self.calls: list[tuple] = []
        self.memory: dict[int, np.ndarray] = {}  # live "device" allocations by address
        self.freed: list[int] = []
        self._streams = 0

    def _call(self, name, *args):
        self.calls.append((name, *args))
        return FakeError(self.fail.get(name, 0))

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def device_ptrs(self) -> set[int]:
        return set(self.memory)

    def _owned(self, ptr: int, nbytes: int) -> bool:
        return any(a <= ptr and ptr + nbytes <= a + m.nbytes for a, m in self.memory.items())

    # --- errors
    def cudaGetErrorName(self, err):
        return FakeError.cudaSuccess, FakeError(int(err)).name.encode()

    def cudaGetErrorString(self, err):
        return FakeError.cudaSuccess, ERROR_STRINGS.get(int(err), b"unknown error")

    # --- device
    def cudaGetDevice(self):
        return self._call("cudaGetDevice"), 0

    def cudaSetDevice(self, device):
        return (self._call("cudaSetDevice", device),)

    def cudaDeviceGetAttribute(self, attr, device):
        return self._call("cudaDeviceGetAttribute", attr, device), int(self.pools)

    def cudaGetDeviceProperties(self, device):
        props = types.SimpleNamespace(name=b"Fake GPU 9000\0\0\0", major=9, minor=0)
        return self._call("cudaGetDeviceProperties", device), props

    # --- memory
    def _alloc(self, name, nbytes, *rest):
        err = self._call(name, nbytes, *rest)
        if err:
            return err, None
        buf = np.zeros(int(nbytes), dtype=np.uint8)
        buf[:] = 0xAB  # device memory comes uninitialized: make that visible
        ptr = buf.ctypes.data
        self.memory[ptr] = buf
        return err, ptr

    def cudaMalloc(self, nbytes):
        return self._alloc("cudaMalloc", nbytes)

    def cudaMallocAsync(self, nbytes, stream):
        return self._alloc("cudaMallocAsync", nbytes, stream)

    def _free(self, name, ptr, *rest):
        err = self._call(name, ptr, *rest)
        if not err:
            assert ptr in self.memory, f"{name} of a pointer that was not allocated"
            del self.memory[ptr]
            self.freed.append(ptr)
        return (err,)

    def cudaFree(self, ptr):
        return self._free("cudaFree", ptr)

    def cudaFreeAsync(self, ptr, stream):
        return self._free("cudaFreeAsync", ptr, stream)

    def cudaMemsetAsync(self, ptr, value, count, stream):
        err = self._call("cudaMemsetAsync", ptr, value, count, stream)
        if not err:
            assert self._owned(ptr, count), "cudaMemsetAsync outside a device allocation"
            ctypes.memset(ptr, value, count)
        return (err,)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        err = self._call("cudaMemcpyAsync", dst, src, count, kind, stream)
        if not err:
            if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
                assert self._owned(dst, count), "H2D copy outside a device allocation"
            if kind == self.cudaMemcpyKind.cudaMemcpyDeviceToHost:
                assert self._owned(src, count), "D2H copy outside a device allocation"
            if kind == self.cudaMemcpyKind.cudaMemcpyDeviceToDevice:
                assert self._owned(src, count) and self._owned(dst, count), "D2D copy outside device memory"
            ctypes.memmove(dst, src, count)
        return (err,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        """The documented semantics: ``height`` rows of ``width`` bytes; row r is read at src + r * spitch and
        written at dst + r * dpitch; width must not exceed either pitch."""
        err = self._call("cudaMemcpy2DAsync", dst, dpitch, src, spitch, width, height, kind, stream)
        if not err:
            assert width <= dpitch and width <= spitch, "cudaMemcpy2D: width exceeds a pitch"
            for r in range(height):
                assert self._owned(src + r * spitch, width) and self._owned(dst + r * dpitch, width)
                ctypes.memmove(dst + r * dpitch, src + r * spitch, width)
        return (err,)

    # --- streams
    def cudaStreamCreate(self):
        self._streams += 1
        return self._call("cudaStreamCreate"), 1000 + self._streams

    def cudaStreamSynchronize(self, stream):
        return (self._call("cudaStreamSynchronize", stream),)

    # --- events (the stand-in runs every call at once, so an event only records where it was recorded)
    cudaEventDisableTiming = 2

    def cudaEventCreateWithFlags(self, flags):
        self._events = getattr(self, "_events", 0) + 1
        return self._call("cudaEventCreateWithFlags", flags), 5000 + self._events

    def cudaEventRecord(self, event, stream):
        return (self._call("cudaEventRecord", event, stream),)

    def cudaStreamWaitEvent(self, stream, event, flags):
        return (self._call("cudaStreamWaitEvent", stream, event, flags),)

    def cudaEventSynchronize(self, event):
        return (self._call("cudaEventSynchronize", event),)

    def cudaEventDestroy(self, event):
        return (self._call("cudaEventDestroy", event),)


# ------------------------------------------------------------------------------------------------- tensorrt
class _DType:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"DataType.{self.name}"


DataType = types.SimpleNamespace(**{n: _DType(n) for n in ("FLOAT", "HALF", "INT32", "INT64", "BF16")})
NP = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64}


class FakeEngine:
    """Inputs/outputs: {name: (DataType, shape with -1 for the dynamic leading dim, max leading dim)}; output k
    is 2 * input k (same shape)."""

    def __init__(self, trt, cudart, inputs: dict, outputs: dict):
        self.trt, self.cudart = trt, cudart
        self.io = {**inputs, **outputs}
        self.modes = {n: trt.TensorIOMode.INPUT for n in inputs} | {
            n: trt.TensorIOMode.OUTPUT for n in outputs
        }
        self.pairs = list(zip(inputs, outputs, strict=True))
        self.num_io_tensors = len(self.io)
        self.contexts = []

    def get_tensor_name(self, i):
        return list(self.io)[i]

    def get_tensor_mode(self, name):
        return self.modes[name]

    def get_tensor_dtype(self, name):
        return self.io[name][0]

    def create_execution_context(self):
        ctx = FakeContext(self)
        self.contexts.append(ctx)
        return ctx


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine = engine
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.streams: list = []

    def set_input_shape(self, name, shape):
        _dtype, want, hi = self.engine.io[name]
        ok = len(shape) == len(want) and 1 <= shape[0] <= hi
        ok = ok and all(w in (-1, s) for w, s in zip(want[1:], shape[1:], strict=True))
        if ok:
            self.shapes[name] = tuple(shape)
        return ok

    def get_tensor_shape(self, name):
        for i, o in self.engine.pairs:
            if o == name:
                return self.shapes.get(i, tuple(self.engine.io[i][1]))
        return self.shapes[name]

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        self.streams.append(stream)
        for i, o in self.engine.pairs:
            shape = self.shapes[i]
            n = int(np.prod(shape))
            src_t, dst_t = NP[self.engine.io[i][0].name], NP[self.engine.io[o][0].name]
            src = np.ctypeslib.as_array(
                (ctypes.c_char * (n * np.dtype(src_t).itemsize)).from_address(self.addresses[i])
            ).view(src_t)
            dst = np.ctypeslib.as_array(
                (ctypes.c_char * (n * np.dtype(dst_t).itemsize)).from_address(self.addresses[o])
            ).view(dst_t)
            dst[:] = (src.astype(np.float64) * 2).astype(dst_t)
        return True


def fake_trt(version: str = "10.3.0", *, fp16_flag: bool = True, strongly_typed: bool = True):
    """A ``tensorrt`` module object. ``fp16_flag``: BuilderFlag.FP16 exists (gone in 11); ``strongly_typed``:
    NetworkDefinitionCreationFlag.STRONGLY_TYPED exists (since 9)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.DataType = DataType
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    flags = {"FP16": "BuilderFlag.FP16"} if fp16_flag else {}
    trt.BuilderFlag = types.SimpleNamespace(TF32="BuilderFlag.TF32", **flags)
    creation = {"STRONGLY_TYPED": 0} if strongly_typed else {}
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(**creation)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.log = []

    class Logger:
        WARNING = "WARNING"

        def __init__(self, level):
            self.level = level

    class Input:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        def __init__(self, flags):
            self.flags = flags
            self.inputs = []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class Parser:
        def __init__(self, network, logger):
            self.network = network
            self.num_errors = 0

        def parse_from_file(self, path):
            trt.log.append(("parse", path))
            self.network.inputs = [Input("x", (-1, 3)), Input("seg_hidden", (-1, 4))]
            return True

    class Config:
        def set_memory_pool_limit(self, pool, size):
            trt.log.append(("pool", pool, size))

        def set_flag(self, flag):
            trt.log.append(("flag", flag))

        def add_optimization_profile(self, profile):
            trt.log.append(("profile", profile.shapes))

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (lo, opt, hi)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            trt.log.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return memoryview(b"serialized engine " + str(network.flags).encode())

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, Parser
    return trt
