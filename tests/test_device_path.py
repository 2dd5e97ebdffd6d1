"""legion_rt/device_path.py: bit-packed masks, the device buffers of a request, the choice between the CPU and the
CUDA pre/post-processing, and DeviceOps driven by stand-in CUDA kernels (host memory behind stand-in device
pointers, tests/cuda_standin.py) — what can be tested without a GPU. The tests marked ``gpu`` run the real kernels
(benchmarks/gpu_check.sh) and skip here with their reason."""

from __future__ import annotations

import ctypes
import types

import numpy as np
import pytest

from legion_rt import ops
from legion_rt.backends.cuda_rt import CudaRuntime
from legion_rt.device_path import (
    DeviceOps,
    buffer_plan,
    choose_path,
    host_return_bytes,
    pack_masks,
    packed_size,
    select_ops,
    unpack_masks,
)
from tests.cuda_standin import FakeCudart


# -------------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("shape", [(3, 7, 5), (1, 1, 1), (2, 8, 8), (0, 4, 4), (4, 33, 17)])
def test_pack_unpack_round_trip_and_bit_order(shape):
    rng = np.random.default_rng(sum(shape))
    masks = rng.random(shape) > 0.5
    packed = pack_masks(masks)
    per = shape[1] * shape[2]
    assert packed.shape == (shape[0], packed_size(per)) and packed.dtype == np.uint8
    for m in range(shape[0]):  # pixel i -> bit i % 8 of byte i // 8 (LSB first), the device kernel's layout
        flat = masks[m].reshape(-1)
        for i in (0, per // 2, per - 1):
            assert bool(packed[m, i // 8] >> (i % 8) & 1) == flat[i]
        if per % 8:
            assert packed[m, -1] >> (per % 8) == 0  # padding bits are zero
    np.testing.assert_array_equal(unpack_masks(packed, shape[1], shape[2]), masks)
    assert pack_masks(masks.astype(np.uint8) * 7).tobytes() == packed.tobytes()  # any non-zero is "on"


def test_unpack_refuses_a_wrong_size():
    with pytest.raises(ValueError, match="expected"):
        unpack_masks(np.zeros((2, 5), np.uint8), 7, 7)
    with pytest.raises(ValueError, match="N, H, W"):
        pack_masks(np.zeros((7, 7), bool))


# ------------------------------------------------------------------------------------------ buffer sizes
def test_buffer_plan_for_a_request(tmp_path):
    from tests.test_trt_build import _manifest

    m = _manifest(tmp_path)
    plan = buffer_plan(m, (1080, 1920), 3)
    assert plan["rgb"].nbytes == 1080 * 1920 * 3
    assert plan["clip_pixels"].shape == (1, 3, 336, 336) and plan["clip_pixels"].nbytes == 3 * 336 * 336 * 4
    assert plan["sam_pixels"].nbytes == 3 * 336 * 336 * 4  # the stand-in manifest's SAM size is 336
    assert plan["sam_embedding"].shape == (1, 256, 64, 64) and plan["seg_hidden"].shape == (3, 64)
    assert plan["low_res"].nbytes == 3 * 256 * 256 * 4 and plan["masks"].nbytes == 3 * 1080 * 1920
    assert plan["packed_masks"].nbytes == 3 * (1080 * 1920 // 8) and plan["bboxes"].nbytes == 96
    back = host_return_bytes(plan)
    assert back == 4 * 1080 * 1920 // 8 + 96 + 24  # 3 packed masks + packed union + boxes + areas
    assert back < (plan["masks"].nbytes + plan["union"].nbytes) / 7.9
    assert {k for k, b in plan.items() if b.side == "to_host"} == {
        "packed_masks",
        "packed_union",
        "bboxes",
        "areas",
    }


# ------------------------------------------------------------------------------------------- path choice
@pytest.mark.parametrize(
    "backend,providers,kernels,cudapy,kind,why",
    [
        ("onnxruntime", ["CPUExecutionProvider"], True, True, "host", "CPU"),
        (
            "onnxruntime",
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
            False,
            True,
            "host",
            "no usable CUDA",
        ),
        ("onnxruntime", ["CUDAExecutionProvider"], True, False, "host", "cuda-python"),
        ("onnxruntime", ["CUDAExecutionProvider"], True, True, "device", "GPU"),
        ("onnxruntime", ["TensorrtExecutionProvider", "CUDAExecutionProvider"], True, True, "device", "GPU"),
        ("tensorrt", ["TensorRT 10.3.0", "CUDAExecutionProvider"], True, True, "device", "tensorrt"),
        ("tensorrt", ["TensorRT 10.3.0"], False, True, "host", "no usable CUDA"),
    ],
)
def test_choose_path(backend, providers, kernels, cudapy, kind, why):
    choice = choose_path(backend, providers, cuda_kernels=kernels, cuda_python=cudapy)
    assert choice.kind == kind and why in choice.reason


def test_select_ops_on_the_cpu_makes_no_cuda_call():
    fake_ops = types.SimpleNamespace(cuda_available=lambda: pytest.fail("CUDA probed on the CPU path"))
    backend = types.SimpleNamespace(name="onnxruntime", providers=["CPUExecutionProvider"])
    chosen, choice = select_ops(backend, fake_ops)
    assert chosen is fake_ops and choice.kind == "host"
    gpu = types.SimpleNamespace(name="onnxruntime", providers=["CUDAExecutionProvider"])
    chosen, choice = select_ops(gpu, types.SimpleNamespace(cuda_available=lambda: False))
    assert choice.kind == "host" and "CUDA kernels" in choice.reason


# ------------------------------------------------------------------------------ DeviceOps, stand-in kernels
def _view(ptr: int, nbytes: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_uint8 * max(nbytes, 1)).from_address(ptr))[:nbytes]


class FakeKernels:
    """The CUDA entry points of legion_rt.ops, run by the CPU kernels on the host memory behind FakeCudart's
    pointers (what the CUDA kernels compute, bit for bit, per tests/test_ops_cuda.py)."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return getattr(ops, name)

    def preprocess_cuda(self, rgb, size, clip_out, sam_out, stream=0, **kw):
        self.calls.append(("preprocess_cuda", stream))
        H, W = size
        img = _view(rgb, H * W * 3).reshape(H, W, 3).copy()
        clip, sam, resized = ops.preprocess(img, **kw)
        _view(clip_out, clip.nbytes)[:] = clip.reshape(-1).view(np.uint8)
        _view(sam_out, sam.nbytes)[:] = sam.reshape(-1).view(np.uint8)
        return resized

    def postprocess_masks_cuda(
        self, low, shape, input_size, size, masks, union, boxes, areas, stream=0, **kw
    ):
        self.calls.append(("postprocess_masks_cuda", stream))
        n, h, w = shape
        arr = _view(low, n * h * w * 4).view(np.float32).reshape(n, h, w).copy()
        m, u, b, a = ops.postprocess_masks(arr, input_size, size, True, **kw)
        _view(masks, m.size)[:] = m.reshape(-1).view(np.uint8)
        _view(union, u.size)[:] = u.reshape(-1).view(np.uint8)
        _view(boxes, b.nbytes)[:] = b.reshape(-1).view(np.uint8)
        _view(areas, a.nbytes)[:] = a.view(np.uint8)

    def pack_masks_cuda(self, masks, n, per_mask, packed, stream=0):
        self.calls.append(("pack_masks_cuda", stream))
        src = _view(masks, n * per_mask).reshape(n, per_mask, 1)
        _view(packed, n * packed_size(per_mask))[:] = pack_masks(src).reshape(-1)


def test_device_ops_match_the_cpu_kernels_and_copy_back_packed_masks_only():
    rt = FakeCudart()
    kernels = FakeKernels()
    dev = DeviceOps(CudaRuntime(rt), kernels)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (90, 160, 3), dtype=np.uint8)
    clip, sam, resized = dev.preprocess(rgb, num_threads=2)
    want = ops.preprocess(rgb)
    np.testing.assert_array_equal(clip, want[0])
    np.testing.assert_array_equal(sam, want[1])
    assert resized == want[2]
    low = (rng.standard_normal((3, 256, 256)) * 3).astype(np.float32)
    got = dev.postprocess_masks(low, resized, (90, 160), with_stats=True, num_threads=2)
    ref = ops.postprocess_masks(low, resized, (90, 160), True)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_array_equal(g, r)
        assert g.dtype == r.dtype
    np.testing.assert_array_equal(dev.postprocess_masks(low, resized, (90, 160)), ref[0])
    # Back to the host: clip + sam pixels (the backends take host arrays today), then packed masks, boxes, areas.
    d2h = [
        c[3]
        for c in rt.calls
        if c[0] == "cudaMemcpyAsync" and c[4] == rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
    ]
    per = 90 * 160
    assert d2h[:2] == [clip.nbytes, sam.nbytes]
    assert d2h[2:5] == [4 * packed_size(per), 3 * 4 * 8, 3 * 8]  # never the [3, 90, 160] masks themselves
    streams = {c[1] for c in kernels.calls}
    assert len(streams) == 1 and 0 not in streams  # one stream of this thread, never the legacy default
    allocs = rt.names().count("cudaMallocAsync")
    dev.preprocess(rgb)
    dev.postprocess_masks(low, resized, (90, 160), with_stats=True)
    assert rt.names().count("cudaMallocAsync") == allocs  # buffers are reused, not reallocated per request
    dev.close()
    assert rt.memory == {}


def test_device_ops_leave_errors_and_empty_batches_to_the_cpu_kernels():
    dev = DeviceOps(CudaRuntime(FakeCudart()), FakeKernels())
    with pytest.raises(ValueError, match="rgb"):
        dev.preprocess(np.zeros((4, 4), np.uint8))
    empty = dev.postprocess_masks(np.zeros((0, 256, 256), np.float32), (10, 10), (10, 10), with_stats=True)
    assert empty[0].shape == (0, 10, 10)
    assert dev.cuda_available is ops.cuda_available  # the rest of legion_rt.ops passes through


# ------------------------------------------------------------------------------------------- on a GPU
@pytest.fixture(scope="module")
def real_device():
    if not ops.cuda_compiled():
        pytest.skip("built without CUDA")
    if not ops.cuda_available():
        pytest.skip("no CUDA device present")
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python (cuda.bindings) is not installed")
    return DeviceOps(CudaRuntime(), ops)


@pytest.mark.gpu
def test_device_ops_on_a_gpu_match_the_cpu_kernels(real_device):
    rng = np.random.default_rng(1)
    for H, W in ((480, 640), (1080, 1920), (37, 1)):
        rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        clip, sam, resized = real_device.preprocess(rgb)
        want = ops.preprocess(rgb)
        np.testing.assert_array_equal(clip, want[0])
        np.testing.assert_array_equal(sam, want[1])
        low = (rng.standard_normal((5, 256, 256)) * 3).astype(np.float32)
        for g, r in zip(
            real_device.postprocess_masks(low, resized, (H, W), True),
            ops.postprocess_masks(low, resized, (H, W), True),
            strict=True,
        ):
            np.testing.assert_array_equal(g, r)


@pytest.mark.gpu
def test_pack_masks_cuda_matches_the_host_layout(real_device):
    cuda = real_device.cuda
    rng = np.random.default_rng(2)
    for n, per in ((3, 1080 * 1920), (2, 13), (1, 8)):
        masks = (rng.random((n, per)) > 0.7).astype(np.uint8)
        stream = cuda.stream_create()
        src, dst = cuda.malloc(masks.nbytes, stream), cuda.malloc(n * packed_size(per), stream)
        cuda.copy_h2d_async(src, masks.ctypes.data, masks.nbytes, stream)
        ops.pack_masks_cuda(src, n, per, dst, stream)
        out = np.empty((n, packed_size(per)), np.uint8)
        cuda.copy_d2h_async(out.ctypes.data, dst, out.nbytes, stream)
        cuda.synchronize(stream)
        np.testing.assert_array_equal(out, pack_masks(masks.reshape(n, per, 1)))
        cuda.free(src, stream)
        cuda.free(dst, stream)
        cuda.synchronize(stream)


def test_gpu_check_script_is_valid_and_names_existing_files():
    import re
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    script = root / "benchmarks" / "gpu_check.sh"
    text = script.read_text()
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(script)], check=True)
    named = set(re.findall(r"(?:tests|benchmarks)/[\w/]+\.py", text))
    assert {"tests/test_ops_cuda.py", "tests/test_device_path.py", "benchmarks/gpu_kernels.py"} <= named
    assert all((root / p).is_file() for p in named), named
    assert "pip install" not in text.replace("no pip", "")  # offline: CMake only, nothing downloaded
