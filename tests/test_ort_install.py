"""The ONNX Runtime installation checks of legion_rt/backends/onnxruntime.py: version floor, the CPU and GPU
wheels installed together (they share the `onnxruntime` module), CUDA asked for on a CPU-only build."""

from __future__ import annotations

import types

import pytest

import legion_rt.backends.onnxruntime as ortb
from legion_rt.errors import BackendError


@pytest.mark.parametrize("version", ["1.17.3", "1.18.1", "1.19.2"])
def test_too_old_onnxruntime_is_refused(version):
    with pytest.raises(BackendError, match=r"too old.*>= 1\.20.*cached prefix"):
        ortb.check_ort_version(types.SimpleNamespace(__version__=version))


@pytest.mark.parametrize("version", ["1.20.0", "1.22.0.dev20250101", "2.0.0"])
def test_recent_onnxruntime_is_accepted(version):
    ortb.check_ort_version(types.SimpleNamespace(__version__=version))


def test_the_installed_onnxruntime_passes_the_version_check():
    ortb._import_ort()


def _installed(monkeypatch, **dists):
    monkeypatch.setattr(ortb, "_dist_version", lambda name: dists.get(name.replace("-", "_")))


def test_cpu_and_gpu_wheels_together_are_named_with_the_fix(monkeypatch):
    _installed(monkeypatch, onnxruntime="1.22.0", onnxruntime_gpu="1.22.0")
    problem = ortb.install_problem(["CPUExecutionProvider"], want_cuda=False)
    assert "several ONNX Runtime packages" in problem
    assert "onnxruntime 1.22.0, onnxruntime-gpu 1.22.0" in problem
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'legion_rt[gpu]'" in problem


def test_asking_for_cuda_on_a_cpu_build_says_what_to_install(monkeypatch):
    _installed(monkeypatch, onnxruntime="1.22.0")
    assert ortb.install_problem(["CPUExecutionProvider"], want_cuda=False) is None
    problem = ortb.install_problem(["CPUExecutionProvider"], want_cuda=True)
    assert "has no CUDA provider" in problem and "legion_rt[gpu]" in problem
    _installed(monkeypatch, onnxruntime_gpu="1.22.0")
    assert "reinstall" in ortb.install_problem(["CPUExecutionProvider"], want_cuda=True)
    assert ortb.install_problem(["CUDAExecutionProvider", "CPUExecutionProvider"], want_cuda=True) is None


def test_resolve_providers_error_carries_the_install_problem(monkeypatch):
    _installed(monkeypatch, onnxruntime="1.22.0", onnxruntime_gpu="1.22.0")
    fake = types.SimpleNamespace(
        __version__="1.22.0", get_available_providers=lambda: ["CPUExecutionProvider"]
    )
    monkeypatch.setattr(ortb, "_import_ort", lambda: fake)
    with pytest.raises(BackendError) as info:
        ortb.resolve_providers(["cuda"])
    msg = str(info.value)
    assert "CUDAExecutionProvider" in msg and "several ONNX Runtime packages" in msg and "\n" not in msg


def test_auto_backend_warns_when_the_gpu_wheel_lost_its_cuda_provider(monkeypatch, tmp_path):
    _installed(monkeypatch, onnxruntime="1.22.0", onnxruntime_gpu="1.22.0")

    class Stop(Exception):
        pass

    def no_sessions(self, art, wanted, *, strict):
        assert wanted == ["CPUExecutionProvider"]
        raise Stop

    fake = types.SimpleNamespace(
        __version__="1.22.0", get_available_providers=lambda: ["CPUExecutionProvider"]
    )
    monkeypatch.setattr(ortb, "_import_ort", lambda: fake)
    monkeypatch.setattr(ortb.OnnxRuntimeBackend, "_open_all", no_sessions)
    with pytest.warns(RuntimeWarning, match="several ONNX Runtime packages"), pytest.raises(Stop):
        ortb.OnnxRuntimeBackend(types.SimpleNamespace(root=tmp_path), auto=True)
