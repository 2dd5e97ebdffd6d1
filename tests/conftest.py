"""Shared fixtures. Heavy ones (a tiny random-weight LEGION checkpoint, its exported artifacts) are built once
per test session and cached under pytest's temporary directory."""

from __future__ import annotations

import os

import pytest

# Keep the 2-core CI machine responsive: tests run their own thread counts explicitly where it matters.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def _torch_or_skip():
    try:
        import torch  # noqa: F401
    except ImportError:  # pragma: no cover - the CI installs the export extra
        pytest.skip(
            "torch is not installed: export-stage tests need the 'export' extra (pip install .[export])"
        )


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    """A random-weight checkpoint in the exact released layout (export.tiny.make_tiny, seed 0, size tiny)."""
    _torch_or_skip()
    from legion_rt.export.tiny import make_tiny

    out = tmp_path_factory.mktemp("tiny-seed0")
    return make_tiny(out, seed=0, size="tiny")


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory, tiny_paths):
    """The tiny checkpoint exported to an artifact directory (fp32 ONNX graphs + manifest)."""
    from legion_rt.export.onnx_export import export_artifacts

    out = tmp_path_factory.mktemp("tiny-art") / "art"
    export_artifacts(
        checkpoint=tiny_paths.checkpoint,
        clip=tiny_paths.clip,
        detector=tiny_paths.detector,
        out=out,
        progress=False,
    )
    return out
