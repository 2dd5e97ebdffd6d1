"""The device-resident request (issue 11, legion_rt/device_path.py ``DevicePath``): device buffers, the choice of
path, the backends' device entry points (ONNX Runtime IOBinding, TensorRT ``set_tensor_address``), the LLM's
hidden state left on the device, and one whole request on the device path — with stand-in sessions, engines and a
stand-in cuda-python whose "device memory" is host memory (tests/cuda_standin.py). The stand-in cuda-python used for
the whole request fails the test on any host copy other than the picture going up and the packed masks, boxes and
areas coming back. The tests marked ``gpu`` run on a real device and skip here with their reason."""

from __future__ import annotations

import ctypes
import types

import numpy as np
import pytest

from legion_rt import ops
from legion_rt.backends.cuda_rt import CudaRuntime
from legion_rt.backends.device_buffer import DeviceBuffer, DeviceBufferPool
from legion_rt.device_path import DeviceOps, DevicePath, choose_path, select_ops
from legion_rt.errors import BackendError
from tests.cuda_standin import DataType, FakeCudart, FakeEngine, fake_trt
from tests.test_device_path import FakeKernels
from tests.test_request import (  # noqa: F401  (detok, pools: fixtures)
    EOS,
    P_END,
    P_START,
    SEG,
    SIZE,
    WORD_B,
    WORD_C,
    FakeBackend,
    FakeLLM,
    H,
    _engine,
    _request,
    detok,
    pools,
)


def _view(ptr: int, nbytes: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_uint8 * max(nbytes, 1)).from_address(ptr))[:nbytes]


def _array(buf: DeviceBuffer) -> np.ndarray:
    """The stand-in device memory behind ``buf`` as an array of its shape and dtype (the test's eyes only)."""
    return _view(buf.ptr, buf.nbytes).view(buf.dtype).reshape(buf.shape)


MANIFEST = types.SimpleNamespace(
    model=types.SimpleNamespace(
        hidden_size=H, sam_embed_dim=256, sam_embedding_hw=(64, 64), low_res_hw=(256, 256)
    )
)


# ------------------------------------------------------------------------------------------- DeviceBuffer
def test_device_buffer_sizes_rows_and_checks():
    buf = DeviceBuffer(0x1000, (3, 256, 256), np.float32, 1, "low_res")
    assert buf.nbytes == 3 * 256 * 256 * 4 and buf.size == 3 * 256 * 256
    row = buf.row(2)
    assert row.ptr == 0x1000 + 2 * 256 * 256 * 4 and row.shape == (1, 256, 256) and row.device_id == 1
    with pytest.raises(BackendError, match=r"row 3 outside 0\.\.2"):
        buf.row(3)
    assert buf.expect((3, 256, 256), np.float32, "mask head output") is buf
    with pytest.raises(BackendError, match=r"mask head output: device buffer low_res is float32 \[3, 256, 256\], "
                                           r"expected float16 \[3, 256, 256\]"):  # fmt: skip
        buf.expect((3, 256, 256), np.float16, "mask head output")
    with pytest.raises(BackendError, match="negative"):
        DeviceBuffer(0, (-1, 4), np.float32)


def test_device_buffer_keeps_an_ortvalue_alive():
    value = types.SimpleNamespace(data_ptr=lambda: 0xBEEF)
    buf = DeviceBuffer.from_ortvalue(value, (1, H), np.float32, 0, "hidden")
    assert buf.ptr == 0xBEEF and buf.owner is value and buf.nbytes == H * 4


def test_pool_reuses_blocks_by_name_and_size_and_frees_all():
    rt = FakeCudart()
    pool = DeviceBufferPool(CudaRuntime(rt))
    a = pool.take("sam_pixels", (1, 3, 8, 8), np.float32, 7)
    pool.give(a)
    b = pool.take("sam_pixels", (1, 3, 4, 4), np.float32, 7)  # smaller: the same block
    assert b.ptr == a.ptr and b.shape == (1, 3, 4, 4)
    c = pool.take("sam_pixels", (1, 3, 8, 8), np.float32, 7)  # the block is taken: a new one
    assert c.ptr != a.ptr and rt.names().count("cudaMallocAsync") == 2
    with pytest.raises(BackendError, match="not taken from this pool"):
        pool.give(DeviceBuffer(123, (1,), np.uint8, name="x"))
    assert pool.allocated_bytes == 2 * 3 * 8 * 8 * 4
    pool.close()
    assert rt.memory == {}


# ------------------------------------------------------------------------------------------- path choice
@pytest.mark.parametrize(
    "backend,providers,device_io,llm_dev,kind,resident,seg",
    [
        ("onnxruntime", ["CPUExecutionProvider"], False, False, "host", False, "host"),  # CPU only
        (
            "onnxruntime",
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
            True,
            True,
            "device",
            True,
            "device",
        ),
        (
            "onnxruntime",
            ["TensorrtExecutionProvider", "CPUExecutionProvider"],
            True,
            True,
            "device",
            True,
            "device",
        ),
        ("tensorrt", ["TensorRT 10.3.0", "CUDAExecutionProvider"], True, True, "device", True, "device"),
        ("tensorrt", ["TensorRT 10.3.0"], True, False, "device", True, "host"),  # TrtLLM returns host arrays
        ("onnxruntime", ["CUDAExecutionProvider"], False, True, "device", False, "host"),  # no device I/O
    ],
)
def test_choose_path_resident_and_seg_hidden(backend, providers, device_io, llm_dev, kind, resident, seg):
    c = choose_path(backend, providers, cuda_kernels=True, cuda_python=True, device_io=device_io,
                    llm_hidden_on_device=llm_dev)  # fmt: skip
    assert (c.kind, c.resident, c.seg_hidden) == (kind, resident, seg), c.reason


class StandinLLM:
    def __init__(self, capable):
        self.can_keep_hidden_on_device = capable
        self.kept = 0

    def keep_hidden_on_device(self):
        self.kept += 1


def _kernels(available=True):
    return types.SimpleNamespace(cuda_available=lambda: available)


@pytest.fixture
def fake_cuda_python(monkeypatch):
    """cuda-python "installed" (its import succeeds) and every CudaRuntime() a stand-in."""
    import legion_rt.backends.cuda_rt as cuda_rt

    rt = FakeCudart()
    monkeypatch.setattr(cuda_rt, "import_cudart", lambda: rt)
    return rt


def test_select_ops_cpu_only_makes_no_cuda_call_and_keeps_the_llm_on_the_host():
    llm = StandinLLM(False)
    backend = types.SimpleNamespace(
        name="onnxruntime", providers=["CPUExecutionProvider"], device_io=False, llm=llm
    )
    kernels = types.SimpleNamespace(cuda_available=lambda: pytest.fail("CUDA probed on the CPU path"))
    chosen, choice = select_ops(backend, kernels, MANIFEST)
    assert chosen is kernels and choice.kind == "host" and not choice.resident and llm.kept == 0


def test_select_ops_cuda_provider_gives_the_resident_path_and_keeps_hidden_on_device(fake_cuda_python):
    llm = StandinLLM(True)
    backend = types.SimpleNamespace(name="onnxruntime", providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                                    device_io=True, llm=llm, device_id=0)  # fmt: skip
    chosen, choice = select_ops(backend, _kernels(), MANIFEST)
    assert isinstance(chosen, DevicePath) and choice.resident and choice.seg_hidden == "device"
    assert llm.kept == 1 and "device buffers" in choice.reason
    assert fake_cuda_python.calls == []  # nothing touches the device before the first request


def test_select_ops_tensorrt_with_its_llm_engine_uploads_the_hidden_state(fake_cuda_python):
    llm = StandinLLM(False)  # TrtLLM: no such ability
    backend = types.SimpleNamespace(name="tensorrt", providers=["TensorRT 10.3.0"], device_io=True, llm=llm)
    chosen, choice = select_ops(backend, _kernels(), MANIFEST)
    assert (
        isinstance(chosen, DevicePath) and choice.resident and choice.seg_hidden == "host" and llm.kept == 0
    )


def test_select_ops_without_manifest_or_device_io_stays_with_host_arrays(fake_cuda_python):
    backend = types.SimpleNamespace(name="tensorrt", providers=["TensorRT 10.3.0"], device_io=True,
                                    llm=StandinLLM(True))  # fmt: skip
    chosen, choice = select_ops(backend, _kernels(), None)
    assert type(chosen) is DeviceOps and choice.kind == "device" and not choice.resident
    _, choice = select_ops(backend, _kernels(False), MANIFEST)
    assert choice.kind == "host" and "CUDA kernels" in choice.reason


# ------------------------------------------------------------------------------ ONNX Runtime: IOBinding
class DeviceValue:
    """An OrtValue on a device: its memory may not be read on the host through ONNX Runtime."""

    def __init__(self, ptr):
        self.ptr = ptr

    def data_ptr(self):
        return self.ptr

    def numpy(self):
        pytest.fail("a device output was copied to the host")


class HostValue:
    def __init__(self, arr):
        self.arr = arr

    def numpy(self):
        return self.arr


class RecordingBinding:
    """IOBinding stand-in: records bind_input / bind_output; outputs bound to "cpu" come back as zeros of
    ``host_shapes``; ``copy_outputs_to_cpu`` (copies every output, device ones included) fails the test."""

    def __init__(self, host_shapes):
        self.calls, self.host_shapes, self.outputs = [], host_shapes, []

    def bind_input(self, name, device_type, device_id, element_type, shape, buffer_ptr):
        self.calls.append(
            ("bind_input", name, device_type, device_id, element_type, tuple(shape), buffer_ptr)
        )

    def bind_output(
        self, name, device_type="cpu", device_id=0, element_type=None, shape=None, buffer_ptr=None
    ):
        self.calls.append(("bind_output", name, device_type, device_id, element_type, shape, buffer_ptr))
        if device_type == "cpu":
            self.outputs.append(HostValue(np.full(self.host_shapes[name], 3.0, np.float32)))
        else:
            self.outputs.append(DeviceValue(buffer_ptr if buffer_ptr is not None else 0xD0))

    def get_outputs(self):
        return self.outputs

    def copy_outputs_to_cpu(self):
        pytest.fail("copy_outputs_to_cpu copies the device outputs too")


class StandinSession:
    def __init__(self, inputs, host_shapes=None):
        self.inputs, self.host_shapes = inputs, host_shapes or {}
        self.bindings, self.runs = [], 0

    def get_inputs(self):
        return [types.SimpleNamespace(name=n, type=t) for n, t in self.inputs.items()]

    def io_binding(self):
        self.bindings.append(RecordingBinding(self.host_shapes))
        return self.bindings[-1]

    def run_with_iobinding(self, binding, run_options=None):
        self.runs += 1

    def run(self, *a, **k):
        pytest.fail("the host-array run() was used on the device path")


def _ort_backend():
    from legion_rt.backends.onnxruntime import OnnxRuntimeBackend

    b = object.__new__(OnnxRuntimeBackend)
    b._sessions = {
        "vision": StandinSession(
            {"pixel_values": "tensor(float)"}, {"image_embeds": (1, 4, H), "cls_logits": (1, 2)}
        ),
        "sam_encoder": StandinSession({"pixel_values": "tensor(float)"}),
        "mask_head": StandinSession({"seg_hidden": "tensor(float)", "image_embeddings": "tensor(float)"}),
    }
    b._input_types = {g: {i.name: i.type for i in s.get_inputs()} for g, s in b._sessions.items()}
    b._run_options = {g: None for g in b._sessions}
    b._vision_in, b._vision_out = "pixel_values", ["image_embeds", "cls_logits"]
    b._sam_in, b._sam_out, b._mask_out = "pixel_values", "image_embeddings", "low_res_masks"
    b.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return b


def test_ort_device_io_binds_device_buffers_and_copies_back_only_host_outputs():
    b = _ort_backend()
    assert b.device_io and not b.runs_on_caller_stream
    clip = DeviceBuffer(0x100, (1, 3, 336, 336), np.float32, 1, "clip")
    embeds, logits = b.vision_device(clip, stream=5)
    assert embeds.shape == (1, 4, H) and logits.shape == (1, 2)
    (vb,) = b._sessions["vision"].bindings
    assert vb.calls == [
        ("bind_input", "pixel_values", "cuda", 1, np.float32, (1, 3, 336, 336), 0x100),
        ("bind_output", "image_embeds", "cpu", 0, None, None, None),
        ("bind_output", "cls_logits", "cpu", 0, None, None, None),
    ]
    px = DeviceBuffer(0x200, (1, 3, 1024, 1024), np.float32, 1, "sam_pixels")
    emb = DeviceBuffer(0x300, (1, 256, 64, 64), np.float32, 1, "sam_embedding")
    b.sam_encoder_device(px, emb, stream=6)
    assert b._sessions["sam_encoder"].bindings[0].calls == [
        ("bind_input", "pixel_values", "cuda", 1, np.float32, (1, 3, 1024, 1024), 0x200),
        ("bind_output", "image_embeddings", "cuda", 1, np.float32, (1, 256, 64, 64), 0x300),
    ]
    seg = DeviceBuffer(0x400, (1, H), np.float32, 1, "seg_hidden")
    low = DeviceBuffer(0x500, (1, 256, 256), np.float32, 1, "low_res")
    b.mask_head_device(seg, emb, low, stream=7)  # the device output is never read through .numpy()
    assert b._sessions["mask_head"].bindings[0].calls == [
        ("bind_input", "seg_hidden", "cuda", 1, np.float32, (1, H), 0x400),
        ("bind_input", "image_embeddings", "cuda", 1, np.float32, (1, 256, 64, 64), 0x300),
        ("bind_output", "low_res_masks", "cuda", 1, np.float32, (1, 256, 256), 0x500),
    ]


def test_ort_device_io_refuses_a_buffer_of_another_dtype():
    b = _ort_backend()
    b._input_types["sam_encoder"]["pixel_values"] = "tensor(float16)"
    px = DeviceBuffer(0x200, (1, 3, 8, 8), np.float32, 0, "sam_pixels")
    with pytest.raises(
        BackendError, match=r"sam_encoder.onnx input pixel_values is tensor\(float16\).*sam_pixels"
    ):
        b.sam_encoder_device(px, DeviceBuffer(0x300, (1, 256, 64, 64), np.float32), None)
    assert b._sessions["sam_encoder"].runs == 0


def test_ort_device_io_is_off_on_the_cpu_provider():
    b = _ort_backend()
    b.providers = ["CPUExecutionProvider"]
    assert not b.device_io


# ------------------------------------------------------------------------------ OrtLLM: hidden on device
class LLMSession:
    """llm.onnx stand-in (GQA graph, fp32 KV: the cache stays on the host) on ``provider``."""

    def __init__(self, provider, graph):
        self.provider, self.graph, self.bindings = provider, graph, []
        names = [graph.inputs_embeds, graph.seqlens_k, graph.total_sequence_length]
        names += [graph.past_key.format(i=0), graph.past_value.format(i=0)]
        self._inputs = [types.SimpleNamespace(name=n) for n in names]

    def get_inputs(self):
        return self._inputs

    def get_providers(self):
        return [self.provider, "CPUExecutionProvider"]

    def get_provider_options(self):
        return {self.provider: {"device_id": "1"}}

    def io_binding(self):
        session = self

        class Binding:
            def __init__(self):
                self.calls, self.outputs = [], []

            def bind_cpu_input(self, name, arr):
                self.calls.append(("cpu_input", name))

            def bind_ortvalue_input(self, name, v):
                self.calls.append(("ortvalue_input", name))

            def bind_ortvalue_output(self, name, v):
                self.outputs.append(v)

            def bind_output(self, name, device_type="cpu", device_id=0):
                self.calls.append(("output", name, device_type, device_id))
                if name == session.graph.logits:
                    self.outputs.append(HostValue(np.arange(10, dtype=np.float32)[None]))
                elif device_type == "cpu":
                    self.outputs.append(HostValue(np.full((1, H), 7.0, np.float32)))
                else:
                    self.outputs.append(DeviceValue(0xF00 + len(session.bindings)))

            def get_outputs(self):
                return self.outputs

        self.bindings.append(Binding())
        return self.bindings[-1]

    def run_with_iobinding(self, binding, run_options=None):
        pass


def _llm(provider):
    from legion_rt.backends.ort_llm import OrtLLM

    graph = types.SimpleNamespace(kind="gqa_shared_kv", kv_dtype="float32", inputs_embeds="embeds", seqlens_k="sk",
                                  total_sequence_length="tot", logits="logits", hidden="hidden", past_key="pk{i}",
                                  past_value="pv{i}", present_key="k{i}", present_value="v{i}")  # fmt: skip
    model = types.SimpleNamespace(num_layers=1, num_kv_heads=1, head_dim=16, hidden_size=H, vocab_size=10,
                                  max_position_embeddings=64)  # fmt: skip
    return OrtLLM(LLMSession(provider, graph), model, graph)


def test_llm_keeps_the_hidden_state_on_the_device_only_when_asked_on_a_gpu_provider():
    llm = _llm("CUDAExecutionProvider")
    assert llm.can_keep_hidden_on_device and llm.device == "cpu"  # fp32 KV: the cache stays on the host
    cache = llm.new_cache(8)
    logits, hidden = llm.forward(cache, np.zeros((1, 2, H), np.float32))
    assert isinstance(hidden, np.ndarray) and hidden.shape == (H,)  # not asked: as before
    assert ("output", "hidden", "cpu", 0) in llm.session.bindings[-1].calls
    llm.keep_hidden_on_device()
    logits, hidden = llm.forward(cache, np.zeros((1, 1, H), np.float32))
    assert ("output", "hidden", "cuda", 1) in llm.session.bindings[-1].calls
    assert isinstance(hidden, DeviceBuffer) and hidden.shape == (1, H) and hidden.device_id == 1
    assert hidden.ptr == 0xF00 + 2 and isinstance(hidden.owner, DeviceValue)  # this call's own OrtValue
    np.testing.assert_array_equal(logits, np.arange(10, dtype=np.float32)) and cache.length == 3


def test_llm_on_the_cpu_provider_refuses_to_keep_the_hidden_state_on_a_device():
    llm = _llm("CPUExecutionProvider")
    assert not llm.can_keep_hidden_on_device
    with pytest.raises(
        BackendError, match="CPUExecutionProvider: its hidden state cannot stay on a CUDA device"
    ):
        llm.keep_hidden_on_device()


# ------------------------------------------------------------------------------ TensorRT: tensor addresses
def _trt_graph(rt, inputs, outputs):
    """A _TrtGraph over a FakeEngine (output k = 2 * input k), built without reading an engine file."""
    import threading
    from pathlib import Path

    from legion_rt.backends import tensorrt as trt_backend

    trt = fake_trt("10.3.0")
    engine = FakeEngine(trt, rt, inputs, outputs)
    path = Path("g.engine")
    graph = object.__new__(trt_backend._TrtGraph)
    graph.trt, graph.cuda, graph.path, graph.engine = trt, CudaRuntime(rt), path, engine
    graph.names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    graph.inputs = [n for n in graph.names if engine.get_tensor_mode(n) == "INPUT"]
    graph.outputs = [n for n in graph.names if engine.get_tensor_mode(n) == "OUTPUT"]
    graph.dtypes = {n: trt_backend.np_dtype(engine.get_tensor_dtype(n)) for n in graph.names}
    graph._local, graph._states, graph._lock = threading.local(), [], threading.Lock()
    return graph, engine


def _device_array(cuda, arr, stream=0):
    ptr = cuda.malloc(arr.nbytes, stream)
    _view(ptr, arr.nbytes)[:] = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    return DeviceBuffer(ptr, arr.shape, arr.dtype)


def test_trt_run_device_binds_addresses_on_the_callers_stream_without_copies():
    rt = FakeCudart()
    cuda = CudaRuntime(rt)
    ins = {"pixel_values": (DataType.FLOAT, (-1, 3, 4, 4), 1)}
    outs = {"image_embeddings": (DataType.FLOAT, (-1, 3, 4, 4), 1)}
    graph, engine = _trt_graph(rt, ins, outs)
    x = np.arange(48, dtype=np.float32).reshape(1, 3, 4, 4)
    src = _device_array(cuda, x)
    dst = _device_array(cuda, np.zeros_like(x))
    rt.calls.clear()
    got = graph.run_device({"pixel_values": src}, {"image_embeddings": dst}, (), stream=42)
    (ctx,) = engine.contexts
    assert got == {} and ctx.addresses == {"pixel_values": src.ptr, "image_embeddings": dst.ptr}
    assert ctx.streams == [42]  # the caller's stream, not the context's own
    assert "cudaMemcpyAsync" not in rt.names() and "cudaStreamSynchronize" not in rt.names()
    np.testing.assert_array_equal(_array(dst), 2 * x)  # the engine wrote the bound output


def test_trt_run_device_host_outputs_and_refusals():
    rt = FakeCudart()
    cuda = CudaRuntime(rt)
    ins = {"pixel_values": (DataType.FLOAT, (-1, 2), 1)}
    outs = {"image_embeds": (DataType.HALF, (-1, 2), 1)}
    graph, _ = _trt_graph(rt, ins, outs)
    src = _device_array(cuda, np.array([[1.5, -2.0]], np.float32))
    got = graph.run_device({"pixel_values": src}, {}, ("image_embeds",), stream=9)
    np.testing.assert_array_equal(got["image_embeds"], np.array([[3.0, -4.0]], np.float16))
    d2h = [c for c in rt.calls if c[0] == "cudaMemcpyAsync"]
    assert len(d2h) == 1 and d2h[0][3] == 4 and d2h[0][-1] == 9  # one f16 [1, 2] output, on the stream
    with pytest.raises(
        BackendError, match=r"input pixel_values: device buffer .* is float16 \[1, 2\], expected float32"
    ):
        graph.run_device({"pixel_values": DeviceBuffer(src.ptr, (1, 2), np.float16)}, {}, (), 9)
    with pytest.raises(BackendError, match=r"output image_embeds: .*expected float16 \[1, 2\]"):
        graph.run_device(
            {"pixel_values": src}, {"image_embeds": DeviceBuffer(src.ptr, (2, 2), np.float16)}, (), 9
        )
    with pytest.raises(BackendError, match="outside the engine's optimization profile"):
        graph.run_device({"pixel_values": DeviceBuffer(src.ptr, (2, 2), np.float32)}, {}, (), 9)
    with pytest.raises(BackendError, match="do not match"):
        graph.run_device({}, {}, (), 9)


def test_trt_backend_device_entry_points_name_the_bindings():
    from legion_rt.backends import tensorrt as trt_backend

    seen = {}

    class G:
        def __init__(self, name):
            self.name = name

        def run_device(self, inputs, outputs, host, stream):
            seen[self.name] = (sorted(inputs), sorted(outputs), tuple(host), stream)
            return {"image_embeds": "E", "cls_logits": "L"}

    b = object.__new__(trt_backend.TensorRTBackend)
    b._graphs = {g: G(g) for g in ("vision", "sam_encoder", "mask_head")}
    b._has_cls = True
    assert b.device_io and b.runs_on_caller_stream
    assert b.vision_device("clip", 1) == ("E", "L")
    b.sam_encoder_device("px", "emb", 2)
    b.mask_head_device(DeviceBuffer(0, (1, H), np.float32), "emb", "low", 3)
    assert seen == {
        "vision": (["pixel_values"], [], ("image_embeds", "cls_logits"), 1),
        "sam_encoder": (["pixel_values"], ["image_embeddings"], (), 2),
        "mask_head": (["image_embeddings", "seg_hidden"], ["low_res_masks"], (), 3),
    }
    with pytest.raises(BackendError, match="33 \\[SEG\\] in one call"):
        b.mask_head_device(DeviceBuffer(0, (33, H), np.float32), "emb", "low", 3)


# ------------------------------------------------------------------------------ a whole request on the device
class GuardedCudart(FakeCudart):
    """FakeCudart that fails the test on a host copy the device path must not make: up, only the picture (and a
    [SEG] hidden state when the LLM returned a host array); down, only the packed masks, boxes and areas."""

    def __init__(self):
        super().__init__()
        self.dev = None
        self.hidden_up = False

    def _in(self, ptr, names):
        for st in self.dev._states:
            for name, (p, size) in st.buffers.items():
                if name in names and p <= ptr < p + size:
                    return True
        return False

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        if kind == self.cudaMemcpyKind.cudaMemcpyDeviceToHost and not self._in(
            src, ("packed", "bboxes", "areas")
        ):
            pytest.fail(f"device-to-host copy of {count} bytes from a buffer that must stay on the device")
        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            allowed = ("rgb", "seg_hidden") if self.hidden_up else ("rgb",)
            if not self._in(dst, allowed):
                pytest.fail(
                    f"host-to-device copy of {count} bytes into a buffer the device path fills itself"
                )
        return super().cudaMemcpyAsync(dst, src, count, kind, stream)


class DeviceLLM(FakeLLM):
    """FakeLLM whose hidden state is a device buffer (as OrtLLM.keep_hidden_on_device gives)."""

    def __init__(self, script, cuda):
        super().__init__(script)
        self.cuda, self.ptrs = cuda, []

    def forward(self, cache, embeds):
        logits, hidden = super().forward(cache, embeds)
        ptr = self.cuda.malloc(hidden.nbytes)
        _view(ptr, hidden.nbytes)[:] = hidden.view(np.uint8)
        self.ptrs.append(ptr)
        return logits, DeviceBuffer(ptr, (1, H), np.float32, 0, "hidden")


class DeviceBackend(FakeBackend):
    """FakeBackend's graphs on device buffers: the SAM "embedding" is the pixel mean, the mask head checks that it
    reads that very embedding, then writes FakeBackend's band for the step in seg_hidden[0, 0]. Every call is
    logged in the cudart call list, so its place among the stream operations is visible."""

    device_io = True

    def __init__(self, llm, rt, caller_stream):
        super().__init__(llm)
        self.rt, self.runs_on_caller_stream = rt, caller_stream

    def vision_device(self, clip, stream):
        self.rt.calls.append(("vision", stream, clip.ptr))
        return self.vision(None)

    def sam_encoder_device(self, pixels, out, stream):
        self.rt.calls.append(("sam_encoder", stream, pixels.ptr, out.ptr))
        _array(out)[...] = _array(pixels).mean()

    def mask_head_device(self, seg_hidden, embedding, out, stream):
        self.rt.calls.append(("mask_head", stream, embedding.ptr))
        assert embedding.shape == (1, 256, 64, 64) and np.all(_array(embedding) == self.sam_mean)
        seg = _array(seg_hidden.expect((1, H), np.float32, "seg_hidden")).copy()
        _array(out)[...] = self.mask_head(seg, None)


@pytest.mark.parametrize("caller_stream", [True, False], ids=["tensorrt-like", "onnxruntime-like"])
@pytest.mark.parametrize("hidden_on_device", [True, False], ids=["hidden-device", "hidden-host"])
def test_a_request_on_the_device_path_matches_the_host_path_without_host_copies(
    detok,  # noqa: F811  (the fixture imported from tests/test_request.py)
    pools,  # noqa: F811
    caller_stream,
    hidden_on_device,
):
    script = [WORD_B, SEG, P_START, WORD_C, SEG, P_END, SEG, EOS]
    host = list(_request(_engine(detok, pools, FakeBackend(FakeLLM(script)))))[-1].result

    rt = GuardedCudart()
    rt.hidden_up = not hidden_on_device
    cuda = CudaRuntime(rt)
    dev = DevicePath(cuda, FakeKernels(), MANIFEST)
    rt.dev = dev
    llm = DeviceLLM(script, cuda) if hidden_on_device else FakeLLM(script)
    backend = DeviceBackend(llm, rt, caller_stream)
    rgb = np.zeros((SIZE, SIZE, 3), np.uint8)
    backend.sam_mean = ops.preprocess(rgb)[1].mean()
    eng = _engine(detok, pools, backend)
    eng._device = dev
    eng._preprocess_device = dev.start_request
    results = [list(_request(eng))[-1].result for _ in range(2)]
    for got in results:
        assert got.token_ids == host.token_ids and len(got.artifacts) == 3
        for a, b in zip(got.artifacts, host.artifacts, strict=True):
            np.testing.assert_array_equal(a.mask, b.mask)
            assert (a.bbox, a.area, a.phrase, a.token_index) == (b.bbox, b.area, b.phrase, b.token_index)
        np.testing.assert_array_equal(got.mask, host.mask)

    calls = rt.calls
    names = [c[0] for c in calls]
    sam = next(c for c in calls if c[0] == "sam_encoder")
    vision = next(c for c in calls if c[0] == "vision")
    req_stream, sam_stream = vision[1], sam[1]
    mask_stream = next(c for c in calls if c[0] == "mask_head")[1]
    assert len({req_stream, sam_stream, mask_stream}) == 3  # the SAM encoder has a stream of its own
    first_sam, first_mask = names.index("sam_encoder"), names.index("mask_head")
    pixels_ready = next(c[1] for c in calls if c[0] == "cudaEventRecord" and c[2] == req_stream)
    sam_ready = next(c[1] for c in calls[first_sam:] if c[0] == "cudaEventRecord")
    assert calls[first_sam - (1 if caller_stream else 2)] == (
        "cudaStreamWaitEvent",
        sam_stream,
        pixels_ready,
        0,
    )
    assert ("cudaStreamWaitEvent", mask_stream, sam_ready, 0) in calls[first_sam:first_mask]
    if caller_stream:  # everything ordered by streams and events: no host wait before a graph
        assert ("cudaStreamSynchronize", req_stream) not in calls[: names.index("vision")]
    else:  # ONNX Runtime runs on its own stream: the producer's stream is drained before the graph reads
        assert calls[names.index("vision") - 1] == ("cudaStreamSynchronize", req_stream)
        assert ("cudaEventSynchronize", sam_ready) in calls[first_sam:first_mask]
    d2d = [
        c for c in calls if c[0] == "cudaMemcpyAsync" and c[4] == rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
    ]
    assert len(d2d) == (6 if hidden_on_device else 0)  # one [SEG] hidden state [1, H] each, device to device
    assert all(c[3] == H * 4 and c[2] in llm.ptrs for c in d2d)
    # both requests used the same SAM pixel / embedding blocks: returned to the pool, not leaked or reallocated
    sam_blocks = {c[3] for c in calls if c[0] == "sam_encoder"}
    assert len(sam_blocks) == 1 and len(dev.pool._free["sam_pixels"]) == 1
    assert names.count("cudaEventCreateWithFlags") == names.count("cudaEventDestroy") == 4
    for ptr in getattr(llm, "ptrs", []):
        cuda.free(ptr)
    dev.close()
    assert rt.memory == {}


def test_a_cancelled_request_gives_its_device_buffers_back(detok, pools):  # noqa: F811  (fixtures, as above)
    import threading

    script = [WORD_B, SEG, SEG, SEG, EOS]
    rt = FakeCudart()
    dev = DevicePath(CudaRuntime(rt), FakeKernels(), MANIFEST)
    gate = threading.Event()
    backend = DeviceBackend(FakeLLM(script), rt, True)
    backend.sam_gate = gate  # the SAM encoder waits: the mask jobs queue behind it
    orig = backend.sam_encoder_device
    backend.sam_encoder_device = lambda p, o, s: (gate.wait(10), orig(p, o, s))
    backend.sam_mean = ops.preprocess(np.zeros((SIZE, SIZE, 3), np.uint8))[1].mean()
    eng = _engine(detok, pools, backend, sam_start="early")
    eng._device, eng._preprocess_device = dev, dev.start_request
    req = _request(eng)
    for ev in req:
        if getattr(ev, "token_id", None) == SEG:
            break
    req.close()
    gate.set()
    pools[0].shutdown(wait=True)
    pools[1].shutdown(wait=True)
    assert sorted(dev.pool._free) == ["sam_embedding", "sam_pixels"]  # every reference dropped
    assert rt.names().count("cudaEventDestroy") == 2
    dev.close()
    assert rt.memory == {}


# ------------------------------------------------------------------------------------------- on a GPU
@pytest.fixture(scope="module")
def real_cuda():
    if not ops.cuda_compiled():
        pytest.skip("legion_rt._C was built without CUDA")
    if not ops.cuda_available():
        pytest.skip("no CUDA device present")
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python (cuda.bindings) is not installed")
    return CudaRuntime()


class CopyBackend:
    """Graphs stood in by device copies on a real GPU: the mask head copies the next precomputed low-res row
    (uploaded once, before the request) into its output buffer, device to device, on the caller's stream."""

    device_io = runs_on_caller_stream = True

    def __init__(self, cuda, low_d, per_row):
        self.cuda, self.low_d, self.per_row, self.calls = cuda, low_d, per_row, 0

    def sam_encoder_device(self, pixels, out, stream):
        self.cuda.memset_async(out.ptr, out.nbytes, stream)

    def mask_head_device(self, seg_hidden, embedding, out, stream):
        self.cuda.copy_d2d_async(out.ptr, self.low_d + self.calls * self.per_row, self.per_row, stream)
        self.calls += 1


@pytest.mark.gpu
def test_device_path_on_a_gpu_matches_the_cpu_kernels(real_cuda):
    cuda = real_cuda
    dev = DevicePath(cuda, ops, MANIFEST)
    rng = np.random.default_rng(3)
    for Hh, W in ((480, 640), (37, 1000)):
        rgb = rng.integers(0, 256, (Hh, W, 3), dtype=np.uint8)
        rd = dev.start_request(rgb)
        want = ops.preprocess(rgb)
        clip = np.empty(rd.clip.shape, np.float32)
        sam = np.empty(rd.sam_pixels.shape, np.float32)
        cuda.copy_d2h_async(clip.ctypes.data, rd.clip.ptr, clip.nbytes, rd.stream)  # the test's check only
        cuda.copy_d2h_async(sam.ctypes.data, rd.sam_pixels.ptr, sam.nbytes, rd.stream)
        cuda.synchronize(rd.stream)
        np.testing.assert_array_equal(clip, want[0])
        np.testing.assert_array_equal(sam, want[1])
        assert rd.resized == want[2]
        low = (rng.standard_normal((3, 256, 256)) * 3).astype(np.float32)
        stream = cuda.stream_create()
        low_d = cuda.malloc(low.nbytes, stream)
        cuda.copy_h2d_async(low_d, low.ctypes.data, low.nbytes, stream)
        cuda.synchronize(stream)
        backend = CopyBackend(cuda, low_d, low[0].nbytes)
        dev.sam_encoder(backend, rd)
        hiddens = [rng.standard_normal(H).astype(np.float32) for _ in range(3)]
        got = dev.masks(backend, rd, hiddens, rd.resized, (Hh, W))
        for g, r in zip(got, ops.postprocess_masks(low, rd.resized, (Hh, W), True), strict=True):
            np.testing.assert_array_equal(g, r)
        rd.release()
        cuda.free(low_d, stream)
        cuda.synchronize(stream)
    dev.close()


@pytest.mark.gpu
def test_onnxruntime_cuda_iobinding_reads_and_writes_device_buffers(real_cuda):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDAExecutionProvider (onnxruntime-gpu is not installed)")
    pytest.importorskip("onnx", reason="onnx is not installed (it writes the one-node test graph)")
    from onnx import TensorProto, helper

    from legion_rt.backends.onnxruntime import OnnxRuntimeBackend

    node = helper.make_node("Mul", ["pixel_values", "two"], ["image_embeddings"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("image_embeddings", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
    b = object.__new__(OnnxRuntimeBackend)
    b._sessions = {"sam_encoder": sess}
    b._input_types = {"sam_encoder": {i.name: i.type for i in sess.get_inputs()}}
    b._sam_in, b._sam_out = "pixel_values", "image_embeddings"
    cuda = real_cuda
    stream = cuda.stream_create()
    x = np.arange(48, dtype=np.float32).reshape(1, 3, 4, 4)
    src = DeviceBuffer(cuda.malloc(x.nbytes, stream), x.shape, np.float32)
    dst = DeviceBuffer(cuda.malloc(x.nbytes, stream), x.shape, np.float32)
    cuda.copy_h2d_async(src.ptr, x.ctypes.data, x.nbytes, stream)
    cuda.synchronize(stream)
    b.sam_encoder_device(src, dst, stream)
    out = np.empty_like(x)
    cuda.copy_d2h_async(out.ctypes.data, dst.ptr, out.nbytes, stream)
    cuda.synchronize(stream)
    np.testing.assert_array_equal(out, 2 * x)
    cuda.free(src.ptr, stream)
    cuda.free(dst.ptr, stream)
    cuda.synchronize(stream)
