"""CUDA kernels on a GPU: same results as the CPU kernels (which match torch / Pillow exactly).

Marked `gpu`; skipped with a reason when the build has no CUDA, when no device is present, or when
cuda-python (`cuda.bindings`, used for device memory and streams) is not installed. Not yet run on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

from legion_rt import ops

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cudart():
    if not ops.cuda_compiled():
        pytest.skip("built without CUDA")
    if not ops.cuda_available():
        pytest.skip("no CUDA device present")
    runtime = pytest.importorskip(
        "cuda.bindings.runtime", reason="cuda-python (cuda.bindings) is not installed"
    )
    return runtime


def _check(result):
    err = result[0]
    assert int(err) == 0, f"CUDA call failed: {err}"
    return result[1] if len(result) == 2 else result[1:]


class Device:
    """Device buffers and one stream, freed at the end."""

    def __init__(self, rt):
        self.rt, self.ptrs = rt, []
        self.stream = _check(rt.cudaStreamCreate())

    def alloc(self, nbytes: int) -> int:
        ptr = int(_check(self.rt.cudaMalloc(max(nbytes, 1))))
        self.ptrs.append(ptr)
        return ptr

    def upload(self, arr: np.ndarray) -> int:
        arr = np.ascontiguousarray(arr)
        ptr = self.alloc(arr.nbytes)
        _check(
            self.rt.cudaMemcpy(
                ptr, arr.ctypes.data, arr.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            )
        )
        return ptr

    def download(self, ptr: int, shape, dtype) -> np.ndarray:
        out = np.empty(shape, dtype)
        _check(
            self.rt.cudaMemcpy(
                out.ctypes.data, ptr, out.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
            )
        )
        return out

    def sync(self):
        _check(self.rt.cudaStreamSynchronize(self.stream))

    def close(self):
        for p in self.ptrs:
            self.rt.cudaFree(p)
        self.rt.cudaStreamDestroy(self.stream)


PREPROCESS_SIZES = [
    (480, 640),
    (1, 37),
    (41, 1),
    (5000, 3000),
    (336, 336),
    (1080, 1920),
    (4000, 600),  # Pillow 13 order: vertical pass first (CLIP and SAM)
    (600, 4000),
    (1000, 1),  # SAM: height-only resize
    (1, 1000),  # SAM: width-only resize
    (4320, 7680),
]


@pytest.mark.parametrize(("h", "w"), PREPROCESS_SIZES)
def test_preprocess_cuda_equals_cpu(cudart, h, w):
    rgb = np.random.default_rng(h + w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    clip_ref, sam_ref, size_ref = ops.preprocess(rgb)
    dev = Device(cudart)
    try:
        src = dev.upload(rgb)
        clip_ptr, sam_ptr = dev.alloc(clip_ref.nbytes), dev.alloc(sam_ref.nbytes)
        size = ops.preprocess_cuda(src, (h, w), clip_ptr, sam_ptr, int(dev.stream))
        dev.sync()
        assert size == size_ref
        np.testing.assert_array_equal(dev.download(clip_ptr, clip_ref.shape, np.float32), clip_ref)
        np.testing.assert_array_equal(dev.download(sam_ptr, sam_ref.shape, np.float32), sam_ref)
    finally:
        dev.close()


@pytest.mark.parametrize(
    ("n", "h", "w"),
    [
        (0, 10, 10),
        (1, 1, 1),
        (8, 1080, 1920),
        (3, 4000, 2),
        (2, 2, 4000),
        (1, 4000, 600),
        (1, 1000, 1),
        (1, 1, 1000),
        (2, 4320, 7680),
        (3, 70000, 40),  # more rows than gridDim.y allows (65535): the kernel's grid-stride loop
    ],
)
def test_postprocess_cuda_equals_cpu(cudart, n, h, w):
    rng = np.random.default_rng(n * 31 + h + w)
    low = np.ascontiguousarray(
        np.repeat(np.repeat(rng.standard_normal((n, 32, 32)) * 4, 8, 1), 8, 2).astype(np.float32)
        + rng.standard_normal((n, 256, 256)).astype(np.float32)
    )
    if n >= 2:
        low[1] = -3.0  # empty mask
    scale = 1024 / max(h, w)
    inp = (int(h * scale + 0.5), int(w * scale + 0.5))
    masks, union, bboxes, areas = ops.postprocess_masks(low, inp, (h, w), with_stats=True)
    dev = Device(cudart)
    try:
        src = dev.upload(low)
        m_ptr, u_ptr = dev.alloc(masks.nbytes), dev.alloc(union.nbytes)
        b_ptr, a_ptr = dev.alloc(bboxes.nbytes), dev.alloc(areas.nbytes)
        ops.postprocess_masks_cuda(src, low.shape, inp, (h, w), m_ptr, u_ptr, b_ptr, a_ptr, int(dev.stream))
        dev.sync()
        np.testing.assert_array_equal(dev.download(m_ptr, masks.shape, np.uint8).astype(bool), masks)
        np.testing.assert_array_equal(dev.download(u_ptr, union.shape, np.uint8).astype(bool), union)
        np.testing.assert_array_equal(dev.download(b_ptr, bboxes.shape, np.int64), bboxes)
        np.testing.assert_array_equal(dev.download(a_ptr, areas.shape, np.int64), areas)
    finally:
        dev.close()


def test_memory_pools_flag_matches_the_driver(cudart):
    """The kernels' scratch allocator asks the device once whether it has memory pools (else cudaMalloc)."""
    attr = cudart.cudaDeviceAttr.cudaDevAttrMemoryPoolsSupported
    want = bool(_check(cudart.cudaDeviceGetAttribute(attr, 0)))
    assert ops.cuda_memory_pools_supported(0) is want
    assert ops.cuda_memory_pools_supported(10_000) is False  # no such device: False, never an error
