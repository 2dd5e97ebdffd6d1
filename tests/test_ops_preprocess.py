"""legion_rt.ops.preprocess / resize_rgb vs Pillow (the reference's resampler) and the reference's float math.

Reference (docs/REFERENCE.md "Preprocessing"):
  CLIP: Pillow bicubic, shorter side -> 336 (long side int(336*long/short)), center crop
        top = (H'-336)//2, left = (W'-336)//2 (transformers 4.28 center_crop), then uint8 * (1/255) in float64,
        cast to float32, (x - mean) / std in float32.
  SAM:  ResizeLongestSide(1024): int(dim * 1024/max(H, W) + 0.5), Pillow bilinear, (x - mean) / std in float32
        on 0..255 values, zero pad to 1024x1024.
Contract: within 1 uint8 step of Pillow before normalization. Measured on this machine (Pillow 13.0.0): 0
steps everywhere (byte-exact), so the normalized floats also match the reference exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from legion_rt import ops

MAX_STEP = 1  # contract: <= 1 uint8 step before normalization; measured 0

CLIP_MEAN = np.array(ops.CLIP_MEAN, np.float32)
CLIP_STD = np.array(ops.CLIP_STD, np.float32)
SAM_MEAN = np.array(ops.SAM_MEAN, np.float32)
SAM_STD = np.array(ops.SAM_STD, np.float32)


def reference_clip_uint8(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    short, long = (w, h) if w <= h else (h, w)
    if short == 336:
        size = (h, w)
    else:
        new_short, new_long = 336, int(336 * long / short)
        size = (new_long, new_short) if w <= h else (new_short, new_long)
    img = np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.BICUBIC))
    top, left = (size[0] - 336) // 2, (size[1] - 336) // 2
    return img[top : top + 336, left : left + 336]


def reference_clip(rgb: np.ndarray) -> np.ndarray:
    x = (reference_clip_uint8(rgb) * (1 / 255)).astype(np.float32)  # float64 product, then float32
    x = (x - CLIP_MEAN) / CLIP_STD  # float32
    return x.transpose(2, 0, 1)[None]  # [1, 3, 336, 336]


def reference_sam_uint8(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = 1024 / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    return np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR))


def reference_sam(rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    a = reference_sam_uint8(rgb)
    x = (a.astype(np.float32) - SAM_MEAN) / SAM_STD
    out = np.zeros((1, 3, 1024, 1024), np.float32)
    out[0, :, : a.shape[0], : a.shape[1]] = x.transpose(2, 0, 1)
    return out, a.shape[:2]


def unnormalize_clip(clip: np.ndarray) -> np.ndarray:
    """Recover the uint8 crop from the CLIP output (exact inverse up to float rounding)."""
    x = clip[0].transpose(1, 2, 0).astype(np.float64) * CLIP_STD + CLIP_MEAN
    return np.rint(x * 255).astype(np.int64)


def unnormalize_sam(sam: np.ndarray, size) -> np.ndarray:
    x = sam[0, :, : size[0], : size[1]].transpose(1, 2, 0).astype(np.float64) * SAM_STD + SAM_MEAN
    return np.rint(x).astype(np.int64)


SIZES = [
    (1, 37),
    (41, 1),
    (1, 1),
    (336, 336),
    (336, 500),
    (700, 336),
    (480, 640),
    (1080, 1920),
    (5000, 3000),
    (3000, 5000),
    (1024, 768),
    (2, 3000),
]


def _random_sizes():
    rng = np.random.default_rng(99)
    out = []
    for _ in range(8):
        h, w = (int(v) for v in rng.integers(2, 2200, size=2))
        out.append((h, w))
    return out


@pytest.mark.parametrize(("h", "w"), SIZES + _random_sizes())
def test_preprocess_matches_pillow(h, w):
    rng = np.random.default_rng(h * 7919 + w)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    clip, sam, size = ops.preprocess(rgb)
    assert clip.dtype == np.float32 and clip.shape == (1, 3, 336, 336)
    assert sam.dtype == np.float32 and sam.shape == (1, 3, 1024, 1024)

    ref_sam, ref_size = reference_sam(rgb)
    assert size == tuple(ref_size)
    # Before normalization: within 1 uint8 step of Pillow (measured: 0).
    clip_step = np.abs(unnormalize_clip(clip) - reference_clip_uint8(rgb)).max()
    sam_step = np.abs(unnormalize_sam(sam, size) - reference_sam_uint8(rgb)).max()
    print(f"{h}x{w}: max uint8 step clip={clip_step} sam={sam_step}")
    assert clip_step <= MAX_STEP and sam_step <= MAX_STEP
    # Padding is exactly zero.
    assert not sam[0, :, size[0] :, :].any() and not sam[0, :, :, size[1] :].any()
    # After normalization: identical to the reference float math (measured: bit-identical).
    if clip_step == 0 and sam_step == 0:
        np.testing.assert_array_equal(clip, reference_clip(rgb))
        np.testing.assert_array_equal(sam, ref_sam)


def test_geometry_matches_reference_formulas():
    for h, w in SIZES + _random_sizes():
        g = ops.preprocess_geometry((h, w))
        short, long = min(h, w), max(h, w)
        new_long = long if short == 336 else int(336 * long / short)
        resized = (new_long, 336) if w <= h else (336, new_long)
        if short == 336:
            resized = (h, w)
        assert g["clip_resized"] == resized
        assert g["clip_crop_offset"] == ((resized[0] - 336) // 2, (resized[1] - 336) // 2)
        scale = 1024 / max(h, w)
        assert g["sam_resized"] == (int(h * scale + 0.5), int(w * scale + 0.5))


def _resize_cases():
    rng = np.random.default_rng(5)
    cases = [
        (640, 480, 336, 410),
        (2000, 336, 7, 3),
        (100, 80, 336, 410),
        (100, 100, 40, 70),
        (100, 100, 40, 71),
        (1, 500, 1, 9),
        (500, 1, 9, 1),
        (3, 3, 1000, 2),
        (2000, 1500, 1024, 768),
    ]
    for _ in range(60):
        cases.append(tuple(int(v) for v in rng.integers(1, 160, size=4)))
    return cases


@pytest.mark.parametrize("resample", ["bilinear", "bicubic"])
def test_resize_rgb_is_byte_exact_with_pillow(resample):
    """Covers both pass orders of Pillow 13 (vertical first when 2*(w-ow) < h-oh while shrinking the height)."""
    pil = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[resample]
    rng = np.random.default_rng(11)
    worst = 0
    for h, w, oh, ow in _resize_cases():
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = np.asarray(Image.fromarray(rgb).resize((ow, oh), pil)).astype(np.int64)
        got = ops.resize_rgb(rgb, (oh, ow), resample)
        assert got.shape == (oh, ow, 3) and got.dtype == np.uint8
        worst = max(worst, int(np.abs(got - ref).max()))
    print(f"{resample}: worst uint8 step {worst}")
    assert worst <= MAX_STEP


def test_overrides_are_used():
    rgb = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    clip, sam, size = ops.preprocess(
        rgb,
        clip_size=224,
        clip_crop=(224, 224),
        sam_size=512,
        clip_mean=(0, 0, 0),
        clip_std=(1, 1, 1),
        sam_mean=(0, 0, 0),
        sam_std=(1, 1, 1),
    )
    assert clip.shape == (1, 3, 224, 224) and sam.shape == (1, 3, 512, 512) and size == (384, 512)
    ref = np.asarray(Image.fromarray(rgb).resize((298, 224), Image.BICUBIC))[:, 37:261]
    np.testing.assert_array_equal(clip[0].transpose(1, 2, 0), (ref * (1 / 255)).astype(np.float32))
    ref_sam = np.asarray(Image.fromarray(rgb).resize((512, 384), Image.BILINEAR))
    np.testing.assert_array_equal(sam[0, :, :384, :].transpose(1, 2, 0), ref_sam.astype(np.float32))


def test_thread_counts_agree():
    rgb = np.random.default_rng(1).integers(0, 256, (777, 1234, 3), dtype=np.uint8)
    a = ops.preprocess(rgb, num_threads=1)
    b = ops.preprocess(rgb, num_threads=3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]


def test_pillow12_pass_order_is_horizontal_first():
    """pillow_order='12' reproduces Pillow <= 12 (horizontal pass first, always): equal to two explicit
    single-axis resizes in that order; '13' differs from it exactly when Pillow 13 goes vertical first."""
    rng = np.random.default_rng(21)
    rgb = rng.integers(0, 256, (640, 480, 3), dtype=np.uint8)
    h_first = ops.resize_rgb(ops.resize_rgb(rgb, (640, 410), "bicubic"), (336, 410), "bicubic")
    v_first = ops.resize_rgb(ops.resize_rgb(rgb, (336, 480), "bicubic"), (336, 410), "bicubic")
    np.testing.assert_array_equal(ops.resize_rgb(rgb, (336, 410), "bicubic", pillow_order="12"), h_first)
    np.testing.assert_array_equal(ops.resize_rgb(rgb, (336, 410), "bicubic", pillow_order="13"), v_first)
    assert not np.array_equal(
        h_first, v_first
    )  # 2*(480-410) = 140 < 640-336 = 304: Pillow 13 goes vertical first
    with pytest.raises(ops.RequestError, match="pillow_order"):
        ops.resize_rgb(rgb, (5, 5), "bicubic", pillow_order="11")
