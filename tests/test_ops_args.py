"""Bad arguments to the native kernels raise typed errors naming the argument (never abort or crash)."""

from __future__ import annotations

import numpy as np
import pytest

from legion_rt import _C, ops
from legion_rt.errors import ImageError, RequestError

GOOD_RGB = np.zeros((20, 30, 3), np.uint8)
GOOD_LOW = np.zeros((2, 256, 256), np.float32)


@pytest.mark.parametrize(
    ("rgb", "match"),
    [
        (np.zeros((20, 30, 3), np.float32), "rgb must have dtype uint8"),
        (np.zeros((20, 30, 3), np.int64), "rgb must have dtype uint8"),
        (np.zeros((20, 30), np.uint8), r"rgb must have shape \[H, W, 3\]"),
        (np.zeros((20, 30, 4), np.uint8), r"rgb must have shape \[H, W, 3\]"),
        (np.zeros((1, 20, 30, 3), np.uint8), r"rgb must have shape \[H, W, 3\]"),
        (np.zeros((20, 60, 3), np.uint8)[:, ::2], "rgb must be C-contiguous"),
        (np.zeros((0, 30, 3), np.uint8), "rgb height must be > 0"),
        (np.zeros((20, 0, 3), np.uint8), "rgb width must be > 0"),
        ([[[0, 0, 0]]], "rgb must be a numpy.ndarray"),
        (np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (1 << 24, 1, 3)), "rgb"),
    ],
)
def test_preprocess_bad_rgb(rgb, match):
    with pytest.raises(ImageError, match=match):
        ops.preprocess(rgb)


def test_preprocess_extreme_aspect_is_refused():
    # 1 x 60000: the CLIP resize would be 336 x 20,160,000 pixels (beyond the float32-exact 2^24 limit).
    rgb = np.zeros((1, 60000, 3), np.uint8)
    with pytest.raises(ImageError, match="rgb aspect ratio 1x60000 is too extreme"):
        ops.preprocess(rgb)


@pytest.mark.parametrize("hw", [(1, 2049), (1, 3000), (2100, 1), (3, 7000)])
def test_preprocess_zero_sized_sam_resize_is_an_image_error(hw):
    # int(1 * 1024 / 2049 + 0.5) == 0: SAM's resize would be empty (this used to crash the process with SIGSEGV).
    rgb = np.zeros((*hw, 3), np.uint8)
    with pytest.raises(ImageError, match=r"rgb aspect ratio .* too extreme: SAM"):
        ops.preprocess(rgb)


def test_preprocess_thinnest_accepted_picture():
    # 1x2048 is the thinnest picture whose SAM resize is not empty: int(1 * 0.5 + 0.5) == 1.
    for hw, want in (((1, 2048), (1, 1024)), ((2048, 1), (1024, 1))):
        _, _, size = ops.preprocess(np.full((*hw, 3), 7, np.uint8))
        assert size == want


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip_size": 0}, "clip_size must be > 0"),
        ({"clip_size": -5}, "clip_size must be > 0"),
        ({"clip_crop": (400, 336)}, "clip_crop .* must not exceed clip_size"),
        ({"clip_crop": (336,)}, "clip_crop must have 2 entries"),
        ({"clip_crop": (336.0, 336)}, r"clip_crop\[0\] must be an int"),
        ({"clip_std": (1, 0, 1)}, r"clip_std\[1\] must be > 0"),
        ({"clip_mean": (0, float("nan"), 0)}, r"clip_mean\[1\] must be finite"),
        ({"sam_mean": (1, 2)}, "sam_mean must have 3 entries"),
        ({"sam_size": 1 << 30}, "sam_size is too large"),
        ({"sam_size": 0}, "sam_size must be > 0"),
        ({"num_threads": -1}, "num_threads"),
    ],
)
def test_preprocess_bad_options(kwargs, match):
    with pytest.raises(RequestError, match=match):
        ops.preprocess(GOOD_RGB, **kwargs)


@pytest.mark.parametrize(
    ("low", "input_size", "original_size", "match"),
    [
        (np.zeros((2, 256, 256), np.float64), (10, 10), (10, 10), "low_res must have dtype float32"),
        (np.zeros((2, 256, 256), np.float16), (10, 10), (10, 10), "low_res must have dtype float32"),
        (np.zeros((256, 256), np.float32), (10, 10), (10, 10), r"low_res must have shape \[N, h, w\]"),
        (np.zeros((1, 1, 256, 256), np.float32), (10, 10), (10, 10), r"low_res must have shape \[N, h, w\]"),
        (np.zeros((2, 256, 512), np.float32)[:, :, ::2], (10, 10), (10, 10), "low_res must be C-contiguous"),
        (np.zeros((2, 0, 256), np.float32), (10, 10), (10, 10), "low_res height must be > 0"),
        (GOOD_LOW, (0, 10), (10, 10), r"input_size\[0\] \(height\) must be > 0"),
        (GOOD_LOW, (10, -3), (10, 10), r"input_size\[1\] \(width\) must be > 0"),
        (GOOD_LOW, (1025, 10), (10, 10), "input_size .* must fit in image_size 1024"),
        (GOOD_LOW, (10, 10), (0, 10), r"original_size\[0\] \(height\) must be > 0"),
        (GOOD_LOW, (10, 10), (10, 1 << 24), r"original_size\[1\] \(width\) is too large"),
        (GOOD_LOW, (10, 10), (1 << 23, 1 << 23), "masks is too large"),
        (GOOD_LOW, (10, 10), (10,), "original_size must have 2 entries"),
        (GOOD_LOW, (10, 10), "ab", "original_size must be a"),
        (GOOD_LOW, (10.5, 10), (10, 10), r"input_size\[0\] must be an int"),
        (GOOD_LOW, (True, 10), (10, 10), r"input_size\[0\] must be an int"),
        ([[0.0]], (10, 10), (10, 10), "low_res must be a numpy.ndarray"),
    ],
)
def test_postprocess_bad_arguments(low, input_size, original_size, match):
    with pytest.raises(RequestError, match=match):
        ops.postprocess_masks(low, input_size, original_size)


def test_numpy_integer_sizes_are_accepted():
    out = ops.postprocess_masks(GOOD_LOW, (np.int64(10), np.int32(12)), [np.int16(5), 6])
    assert out.shape == (2, 5, 6)


def test_errors_are_value_errors_with_one_line():
    with pytest.raises(ValueError) as info:
        ops.postprocess_masks(GOOD_LOW, (10, 10), (0, 10))
    assert "\n" not in str(info.value)


def test_resize_bad_filter():
    with pytest.raises(RequestError, match="filter must be 'bilinear' or 'bicubic'"):
        ops.resize_rgb(GOOD_RGB, (5, 5), "lanczos")


def test_cuda_entry_points_without_cuda_raise_cleanly():
    if ops.cuda_available():
        pytest.skip("a CUDA device is present: the no-device path cannot be tested here")
    with pytest.raises(RequestError, match="rgb must be a non-null device pointer"):
        ops.preprocess_cuda(0, (10, 10), 1, 1)
    with pytest.raises(RequestError, match="union_out, bboxes_out and areas_out must be given together"):
        ops.postprocess_masks_cuda(1, (1, 256, 256), (10, 10), (10, 10), 1, union_out_ptr=1)
    # Valid arguments but no device (or no CUDA in the build): a RuntimeError naming the failure, no crash.
    with pytest.raises(RuntimeError, match="without CUDA|failed"):
        ops.postprocess_masks_cuda(1, (1, 256, 256), (10, 10), (10, 10), 1)


def test_cuda_available_is_a_bool_and_false_without_a_device():
    import legion_rt

    got = ops.cuda_available()
    assert type(got) is bool
    assert legion_rt.cuda_available() is got
    # True exactly when the build has CUDA and the runtime reports a device.
    assert got == (ops.cuda_compiled() and _C.cuda_device_count() > 0)
    if _C.cuda_device_count() == 0:
        assert got is False


def test_cuda_available_never_raises(monkeypatch):
    """A failing native check (broken driver, missing symbol) reads as "no CUDA", never as an exception."""
    import legion_rt

    def boom():
        raise RuntimeError("cudaGetDeviceCount failed: driver shutting down")

    monkeypatch.setattr(ops, "_C", _BrokenC(boom))
    assert ops.cuda_available() is False
    assert legion_rt.cuda_available() is False
    # The package-level function also survives a failure inside ops itself.
    monkeypatch.setattr(ops, "cuda_available", boom)
    assert legion_rt.cuda_available() is False


class _BrokenC:
    """Stands in for legion_rt._C: the CUDA checks raise, everything else is the real module."""

    def __init__(self, boom):
        self.cuda_compiled = lambda: True
        self.cuda_device_count = boom

    def __getattr__(self, name):
        return getattr(_C, name)


def test_memory_pools_query_never_raises():
    """Without a CUDA device (this CI) the pools query answers False; it never raises, whatever the argument."""
    got = ops.cuda_memory_pools_supported(0)
    assert isinstance(got, bool)
    if not ops.cuda_available():
        assert got is False
    assert ops.cuda_memory_pools_supported(-1) is False
    assert ops.cuda_memory_pools_supported("x") is False
