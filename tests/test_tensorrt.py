"""legion_rt/backends/tensorrt.py against stand-in ``tensorrt`` and cuda-python modules (tests/cuda_standin.py):
the TensorRT 10.3 .. 11 differences, engine building, and the execution path (buffers allocated once per
context, async copies on the context's stream, binding dtypes, profile checks). The real thing needs a GPU:
see the tests marked ``tensorrt``."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import threading
import types
from pathlib import Path

import numpy as np
import pytest

from legion_rt.backends import tensorrt as trt_backend
from legion_rt.backends.cuda_rt import CudaRuntime
from legion_rt.errors import BackendError
from tests.cuda_standin import DataType, FakeCudart, FakeEngine, fake_trt


# --------------------------------------------------------------------------------------------- versions
@pytest.mark.parametrize(
    "version,fp16_flag,graph_fp16,want_flags,want_builder",
    [
        ("10.3.0", True, False, 0, ["BuilderFlag.FP16"]),  # JetPack 6: weakly typed + FP16
        ("10.3.0", True, True, 1 << 0, []),  # an fp16 graph: strongly typed
        ("10.12.0.36", True, False, 0, ["BuilderFlag.FP16"]),  # FP16 deprecated but present
        ("11.0.0", False, True, 0, []),  # 11: always strongly typed, the flag is not passed
    ],
)
def test_network_setup_per_version(version, fp16_flag, graph_fp16, want_flags, want_builder):
    trt = fake_trt(version, fp16_flag=fp16_flag)
    assert trt_backend.network_setup(trt, graph_fp16) == (want_flags, want_builder)


def test_tensorrt_11_refuses_fp32_graphs_with_the_fix():
    trt = fake_trt("11.0.0", fp16_flag=False)
    with pytest.raises(BackendError, match=r"strongly typed.*--precision fp16"):
        trt_backend.network_setup(trt, False)


@pytest.mark.parametrize("version", ["8.6.2", "10.2.0", "9.3.0.post12.dev1"])
def test_too_old_tensorrt_is_refused(version):
    with pytest.raises(BackendError, match=r"too old.*>= 10\.3"):
        trt_backend.check_trt_version(fake_trt(version))
    trt_backend.check_trt_version(fake_trt("10.3.0"))
    trt_backend.check_trt_version(fake_trt("11.1.0", fp16_flag=False))


def test_binding_dtypes_map_to_numpy():
    assert trt_backend.np_dtype(DataType.HALF) == np.float16
    assert trt_backend.np_dtype(DataType.INT64) == np.int64
    with pytest.raises(BackendError, match="BF16"):
        trt_backend.np_dtype(DataType.BF16)


# ---------------------------------------------------------------------------------------------- building
def _art(tmp_path: Path, precision: str):
    for g in trt_backend.TRT_GRAPHS:
        (tmp_path / f"{g}.onnx").write_bytes(b"onnx")
    graphs = types.SimpleNamespace(
        **{g: types.SimpleNamespace(precision=precision, file=f"{g}.onnx") for g in trt_backend.TRT_GRAPHS}
    )
    return types.SimpleNamespace(
        root=tmp_path,
        manifest=types.SimpleNamespace(precision=precision, graphs=graphs),
        graph_path=lambda g: tmp_path / f"{g}.onnx",
    )


@pytest.fixture
def standins(monkeypatch):
    """Installs a stand-in ``tensorrt`` (10.3) and cuda-python for tensorrt.py; returns (trt, cudart)."""
    trt, rt = fake_trt("10.3.0"), FakeCudart()
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", trt)
    monkeypatch.setattr(trt_backend, "CudaRuntime", lambda: CudaRuntime(rt))
    return trt, rt


@pytest.mark.parametrize("precision,flags,builder", [("fp32", 0, ["BuilderFlag.FP16"]), ("fp16", 1, [])])
def test_build_engines_with_a_standin(tmp_path, standins, precision, flags, builder):
    trt, _rt = standins
    out = trt_backend.build_engines(_art(tmp_path, precision), "fp16", workspace_gb=0.5, log=lambda m: None)
    assert out.name == "Fake_GPU_9000-sm90-trt10.3.0"
    meta = json.loads((out / "engines.json").read_text())
    for g in trt_backend.TRT_GRAPHS:
        data = (out / meta["engines"][g]["file"]).read_bytes()
        assert meta["engines"][g]["sha256"] == hashlib.sha256(data).hexdigest()
    assert [e[1] for e in trt.log if e[0] == "create_network"] == [flags] * 3
    assert [e[1] for e in trt.log if e[0] == "flag"] == builder * 3
    assert ("pool", "WORKSPACE", 512 * 1024**2) in trt.log
    profiles = [e[1] for e in trt.log if e[0] == "profile"]
    assert profiles[2]["seg_hidden"] == ([1, 4], [4, 4], [32, 4])  # mask_head: N in 1..MAX_MASKS


def test_build_engines_on_tensorrt_11_with_fp32_artifacts_is_refused_before_building(tmp_path, monkeypatch):
    trt = fake_trt("11.0.0", fp16_flag=False)
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", trt)
    monkeypatch.setattr(trt_backend, "CudaRuntime", lambda: CudaRuntime(FakeCudart()))
    with pytest.raises(BackendError, match="--precision fp16"):
        trt_backend.build_engines(_art(tmp_path, "fp32"), "fp16", log=lambda m: None)
    assert not (tmp_path / "tensorrt").exists() and trt.log == []


# --------------------------------------------------------------------------------------------- execution
def _graph(tmp_path, rt, inputs, outputs, *, pools=True):
    trt = fake_trt("10.3.0")
    rt.pools = pools
    engine = FakeEngine(trt, rt, inputs, outputs)
    path = tmp_path / "g.engine"
    path.write_bytes(b"engine")
    runtime = types.SimpleNamespace(deserialize_cuda_engine=lambda data: engine)
    graph = trt_backend._TrtGraph(trt, CudaRuntime(rt), runtime, path, hashlib.sha256(b"engine").hexdigest())
    return graph, engine


IO_IN = {"seg_hidden": (DataType.FLOAT, (-1, 4), 32), "ids": (DataType.INT32, (-1, 3), 8)}
IO_OUT = {"masks": (DataType.HALF, (-1, 4), 32), "ids_out": (DataType.INT64, (-1, 3), 8)}


@pytest.mark.parametrize("pools", [True, False])
def test_buffers_are_allocated_once_per_context_and_grow_only(tmp_path, pools):
    rt = FakeCudart()
    graph, engine = _graph(tmp_path, rt, IO_IN, IO_OUT, pools=pools)
    alloc, free = ("cudaMallocAsync", "cudaFreeAsync") if pools else ("cudaMalloc", "cudaFree")
    rng = np.random.default_rng(0)

    def feeds(n):
        return {"seg_hidden": rng.standard_normal((n, 4)), "ids": rng.integers(-50, 50, (n, 3))}

    for n in (4, 4, 2, 3):  # first call allocates the 4 buffers; equal or smaller shapes reuse them
        f = feeds(n)
        out = graph.run(f)
        assert out["masks"].dtype == np.float16 and out["ids_out"].dtype == np.int64
        np.testing.assert_array_equal(
            out["masks"], (f["seg_hidden"].astype(np.float32) * 2).astype(np.float16)
        )
        np.testing.assert_array_equal(out["ids_out"], f["ids"] * 2)
    names = rt.names()
    assert names.count(alloc) == 4 and names.count(free) == 0
    assert names.count("cudaStreamCreate") == 1 and names.count("cudaDeviceGetAttribute") == 1


def test_larger_shape_grows_only_the_buffers_that_need_it(tmp_path):
    rt = FakeCudart()
    graph, _engine = _graph(tmp_path, rt, IO_IN, IO_OUT)
    graph.run({"seg_hidden": np.ones((2, 4)), "ids": np.ones((8, 3))})
    rt.calls.clear()
    graph.run({"seg_hidden": np.ones((5, 4)), "ids": np.ones((8, 3))})  # seg_hidden and masks grow
    assert rt.names().count("cudaMallocAsync") == 2 and rt.names().count("cudaFreeAsync") == 2
    rt.calls.clear()
    graph.run({"seg_hidden": np.ones((5, 4)), "ids": np.ones((1, 3))})
    assert "cudaMallocAsync" not in rt.names() and "cudaFreeAsync" not in rt.names()
    graph.close()
    assert rt.memory == {}


def test_copies_are_async_on_the_context_stream_and_in_the_binding_dtype(tmp_path):
    rt = FakeCudart()
    graph, engine = _graph(tmp_path, rt, IO_IN, IO_OUT)
    graph.run({"seg_hidden": np.ones((3, 4), np.float64), "ids": np.arange(6).reshape(2, 3)})
    (ctx,) = engine.contexts
    stream = ctx.streams[0]
    copies = [c for c in rt.calls if c[0] == "cudaMemcpyAsync"]
    assert len(copies) == 4 and all(c[-1] == stream for c in copies)
    sizes = sorted(c[3] for c in copies)
    # f32 [3,4] = 48 bytes in, int32 [2,3] = 24 bytes in, f16 [3,4] = 24 out, int64 [2,3] = 48 out
    assert sizes == [24, 24, 48, 48]
    assert not any(c[0] in ("cudaMemcpy", "cudaMalloc", "cudaFree") for c in rt.calls)
    # inputs copied before execution, outputs after it, one synchronize at the end
    assert rt.names()[-1] == "cudaStreamSynchronize" and rt.calls[-1][1] == stream


def test_out_of_profile_shape_raises_backend_error(tmp_path):
    rt = FakeCudart()
    graph, _engine = _graph(tmp_path, rt, IO_IN, IO_OUT)
    with pytest.raises(BackendError, match=r"input seg_hidden of shape \(33, 4\) is outside .*profile"):
        graph.run({"seg_hidden": np.ones((33, 4)), "ids": np.ones((1, 3))})
    with pytest.raises(BackendError, match="do not match"):
        graph.run({"seg_hidden": np.ones((1, 4))})


def test_each_thread_gets_its_own_context_stream_and_buffers(tmp_path):
    rt = FakeCudart()
    graph, engine = _graph(tmp_path, rt, IO_IN, IO_OUT)
    feeds = {"seg_hidden": np.ones((2, 4)), "ids": np.ones((2, 3))}
    threads = [threading.Thread(target=graph.run, args=(feeds,)) for _ in range(2)]
    graph.run(feeds)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(engine.contexts) == 3
    assert len({c.streams[0] for c in engine.contexts}) == 3
    assert rt.names().count("cudaMallocAsync") == 3 * 4
    graph.close()
    assert rt.memory == {}


# ------------------------------------------------------------------------------------------- real thing
@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_tensorrt_version_is_supported():
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("TensorRT is not installed")
    import tensorrt

    trt_backend.check_trt_version(tensorrt)
    trt_backend.network_setup(tensorrt, True)
