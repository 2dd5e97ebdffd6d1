"""legion_rt/backends/cuda_rt.py with a stand-in cuda-python runtime module (tests/cuda_standin.py): import paths,
error translation, the memory-pool check and the KV-prefix 2D-copy geometry. No GPU needed."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from legion_rt.backends import cuda_rt
from legion_rt.backends.cuda_rt import CudaRuntime, prefix_copy_geometry
from legion_rt.errors import BackendError
from tests.cuda_standin import FakeCudart, FakeError


# ------------------------------------------------------------------------------------------ import paths
def _modules(monkeypatch, **mods):
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, mods.get(name))  # None: `import` raises ImportError


def test_import_prefers_cuda_bindings_runtime(monkeypatch):
    new, old = FakeCudart(), FakeCudart()
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = new
    cuda = types.ModuleType("cuda")
    cuda.bindings, cuda.cudart = bindings, old
    _modules(monkeypatch, **{"cuda": cuda, "cuda.bindings": bindings, "cuda.bindings.runtime": new})
    assert cuda_rt.import_cudart() is new


def test_import_falls_back_to_cuda_cudart(monkeypatch):
    old = FakeCudart()
    cuda = types.ModuleType("cuda")
    cuda.cudart = old
    _modules(monkeypatch, **{"cuda": cuda, "cuda.cudart": old})  # cuda.bindings: absent (cuda-python < 12.6)
    assert cuda_rt.import_cudart() is old


def test_missing_cuda_python_names_the_extras(monkeypatch):
    _modules(monkeypatch)
    with pytest.raises(BackendError, match=r"cuda-python is not installed.*legion_rt\[cuda12\].*cuda13"):
        cuda_rt.import_cudart()


def test_importing_the_backends_imports_no_cuda_python():
    """No CUDA call (nor cuda-python / tensorrt import) at import time."""
    import subprocess

    code = (
        "import sys, legion_rt.backends.cuda_rt, legion_rt.backends.tensorrt, legion_rt.backends.ort_llm; "
        "bad = [m for m in sys.modules if m in ('cuda', 'tensorrt') or m.startswith('cuda.')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "err,words",
    [
        (FakeError.cudaErrorNoDevice, ["cudaErrorNoDevice (100)", "no CUDA-capable device", "nvidia-smi"]),
        (FakeError.cudaErrorInsufficientDriver, ["cudaErrorInsufficientDriver (35)", "driver", "cuda12"]),
        (FakeError.cudaErrorMemoryAllocation, ["cudaErrorMemoryAllocation (2)", "out of GPU memory"]),
    ],
)
def test_check_names_the_error_and_what_to_do(err, words):
    cuda = CudaRuntime(FakeCudart())
    with pytest.raises(BackendError) as info:
        cuda.check((err, None), "cudaMalloc(64)")
    msg = str(info.value)
    assert msg.startswith("cudaMalloc(64) failed: ")
    for w in words:
        assert w in msg
    assert "\n" not in msg


def test_check_returns_the_values():
    cuda = CudaRuntime(FakeCudart())
    assert cuda.check((FakeError.cudaSuccess, 1234)) == 1234
    assert cuda.check((FakeError.cudaSuccess, 1, 2)) == (1, 2)
    assert cuda.check((FakeError.cudaSuccess,)) is None
    assert cuda.check(FakeError.cudaSuccess) is None


def test_check_without_names_from_the_bindings_still_says_which_error():
    rt = types.SimpleNamespace()  # bindings that cannot name errors (no cudaGetErrorName)
    with pytest.raises(BackendError, match=r"cudaErrorNoDevice \(100\).*CUDA_VISIBLE_DEVICES"):
        CudaRuntime(rt).check((100,), "cudaGetDevice")
    with pytest.raises(BackendError, match=r"CUDA error \(9999\)"):
        CudaRuntime(rt).check((9999,), "cudaGetDevice")


# ------------------------------------------------------------------------------------------ memory pools
@pytest.mark.parametrize("pools", [True, False])
def test_malloc_uses_pools_only_where_supported_and_asks_once(pools):
    rt = FakeCudart(pools=pools)
    cuda = CudaRuntime(rt)
    ptrs = [cuda.malloc(100, stream=7, device=0) for _ in range(3)]
    for p in ptrs:
        cuda.free(p, stream=7, device=0)
    names = rt.names()
    assert names.count("cudaDeviceGetAttribute") == 1
    assert rt.calls[names.index("cudaDeviceGetAttribute")][1:] == (115, 0)
    if pools:
        assert names.count("cudaMallocAsync") == 3 and names.count("cudaFreeAsync") == 3
        assert "cudaMalloc" not in names and "cudaFree" not in names
        assert all(c[-1] == 7 for c in rt.calls if c[0] in ("cudaMallocAsync", "cudaFreeAsync"))
    else:
        assert names.count("cudaMalloc") == 3 and names.count("cudaFree") == 3
        assert "cudaMallocAsync" not in names and "cudaFreeAsync" not in names
    assert rt.memory == {}


def test_out_of_memory_surfaces_as_backend_error():
    rt = FakeCudart(fail={"cudaMallocAsync": 2})
    with pytest.raises(BackendError, match=r"cudaMallocAsync\(4096\) failed: cudaErrorMemoryAllocation"):
        CudaRuntime(rt).malloc(4096, device=0)


# --------------------------------------------------------------------------------------- 2D prefix copy
def test_prefix_geometry_numbers():
    # [1, KVH=8, MAX, D=128] fp16, 600 filled positions, capacity 700 -> 1200
    g = prefix_copy_geometry((1, 8, 700, 128), (1, 8, 1200, 128), 600, 2)
    assert (g.width, g.height) == (600 * 128 * 2, 8)
    assert g.spitch == 700 * 128 * 2 and g.dpitch == 1200 * 128 * 2
    assert prefix_copy_geometry((1, 8, 700, 128), (1, 8, 1200, 128), 0, 2) is None
    with pytest.raises(ValueError):
        prefix_copy_geometry((1, 8, 700, 128), (1, 8, 500, 128), 600, 2)  # prefix longer than the target
    with pytest.raises(ValueError):
        prefix_copy_geometry((1, 8, 700, 128), (1, 4, 700, 128), 10, 2)


@pytest.mark.parametrize(
    "heads,src_max,dst_max,n,d,dtype",
    [(2, 16, 40, 9, 16, np.float16), (3, 5, 5, 5, 8, np.float32), (1, 7, 30, 1, 64, np.float16)],
)
def test_one_2d_copy_moves_exactly_the_filled_prefix(heads, src_max, dst_max, n, d, dtype):
    """The 2D copy's rows/pitches, carried out on host memory by the stand-in with cudaMemcpy2D's documented
    semantics: the destination holds the source's first n positions of every head and nothing else changes."""
    rt = FakeCudart()
    cuda = CudaRuntime(rt)
    rng = np.random.default_rng(0)
    src = rng.standard_normal((1, heads, src_max, d)).astype(dtype)
    rt.memory[src.ctypes.data] = src.view(np.uint8).reshape(-1)  # "device" buffers for the stand-in
    dst = np.full((1, heads, dst_max, d), 7, dtype=dtype)
    rt.memory[dst.ctypes.data] = dst.view(np.uint8).reshape(-1)
    g = prefix_copy_geometry(src.shape, dst.shape, n, src.itemsize)
    cuda.copy_prefix_2d(dst.ctypes.data, src.ctypes.data, g, stream=3)
    assert rt.names() == ["cudaMemcpy2DAsync"]  # one copy for the whole buffer
    call = rt.calls[0]
    assert call[7] == rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice and call[8] == 3
    np.testing.assert_array_equal(dst[:, :, :n], src[:, :, :n])
    assert np.all(dst[:, :, n:] == 7)
