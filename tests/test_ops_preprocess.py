"""legion_rt.ops.preprocess / resize_rgb vs Pillow (the reference's resampler) and the reference's float math.

Reference (LEGION's preprocessing, as export/reference.py runs it):
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


PILLOW13 = int(Image.__version__.split(".")[0]) >= 13
FULL_RESIZE_LIMIT = 4_000_000  # larger resizes are computed window-only (see pillow_resize_window)


def pillow_vertical_first(h: int, w: int, oh: int, ow: int) -> bool:
    """Pillow 13's pass order (legion_rt.ops module doc): vertical first when it shrinks the height and
    2 * (w - ow) < h - oh; Pillow <= 12 always went horizontal first."""
    return PILLOW13 and oh < h and ow != w and 2 * (w - ow) < h - oh


def _pil_resize(a: np.ndarray, oh: int, ow: int, resample) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((ow, oh), resample))


def pillow_resize_window(rgb, size, top, left, crop, resample, *, full_limit=FULL_RESIZE_LIMIT):
    """Pillow's resize of rgb to size (h, w), cropped to rows [top, top + crop[0]) x cols [left, left + crop[1]).

    Up to full_limit output pixels: one Image.resize, then the crop. Larger (a 1x1000 picture's CLIP resize is
    336 x 336000): Pillow's own two single-axis passes in its pass order, since a two-pass Image.resize is
    exactly its first pass into a uint8 image followed by its second pass. The second pass treats every row
    (horizontal) or column (vertical) on its own, so it runs only on the cropped rows / columns (vertical: in
    column chunks, to keep memory low). test_window_reference_equals_one_resize checks this against a full
    Image.resize."""
    h, w = rgb.shape[:2]
    oh, ow = size
    rows, cols = slice(top, top + crop[0]), slice(left, left + crop[1])
    if oh * ow <= full_limit:
        return _pil_resize(rgb, oh, ow, resample)[rows, cols]
    if pillow_vertical_first(h, w, oh, ow):
        inter = _pil_resize(rgb, oh, w, resample)[rows]  # the vertical pass (oh < h: no larger than rgb)
        return (_pil_resize(inter, crop[0], ow, resample) if ow != w else inter)[:, cols]
    inter = (_pil_resize(rgb, h, ow, resample) if ow != w else rgb)[:, cols]
    if oh == h:
        return inter[rows]
    chunks = [
        _pil_resize(inter[:, c : c + 16], oh, inter[:, c : c + 16].shape[1], resample)[rows]
        for c in range(0, crop[1], 16)
    ]
    return np.concatenate(chunks, axis=1)


def reference_clip_uint8(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    short, long = (w, h) if w <= h else (h, w)
    if short == 336:
        size = (h, w)
    else:
        new_short, new_long = 336, int(336 * long / short)
        size = (new_long, new_short) if w <= h else (new_short, new_long)
    top, left = (size[0] - 336) // 2, (size[1] - 336) // 2
    return pillow_resize_window(rgb, size, top, left, (336, 336), Image.BICUBIC)


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
    # Pillow 13 resamples vertically first here (CLIP 4000x600 -> 2240x336, SAM -> 1024x154):
    (4000, 600),
    (600, 4000),  # the transposed case stays horizontal first
    (1000, 1),  # SAM: height only (1000 -> 1024, width 1 kept); CLIP: 336000 x 336
    (1, 1000),  # SAM: width only; CLIP: 336 x 336000
    (4320, 7680),  # 8K
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
        (4000, 600, 2240, 336),  # vertical first (Pillow 13)
        (4000, 600, 1024, 154),
        (600, 4000, 336, 2240),
        (1000, 1, 1024, 1),  # height only
        (1, 1000, 1, 1024),  # width only
        (1000, 1, 700, 1),
        (1, 1000, 1, 300),
        (4320, 7680, 336, 597),
        (4320, 7680, 576, 1024),
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


@pytest.mark.parametrize(
    ("h", "w", "size"),
    [
        (1, 37, (336, 12432)),  # horizontal first, both passes
        (41, 1, (13776, 336)),
        (1000, 400, (840, 336)),  # vertical first (Pillow 13: 2 * 64 < 160)
        (500, 900, (336, 604)),  # shrinking, horizontal first
        (336, 90, (336, 400)),  # width only
        (90, 336, (400, 336)),  # height only
    ],
)
def test_window_reference_equals_one_resize(h, w, size):
    """The window-only Pillow reference used for huge CLIP resizes equals Image.resize + crop."""
    rgb = np.random.default_rng(h * 31 + w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    if size == (840, 336):
        assert pillow_vertical_first(h, w, *size) == PILLOW13
    top, left = (size[0] - 336) // 2, (size[1] - 336) // 2
    for resample in (Image.BICUBIC, Image.BILINEAR):
        full = pillow_resize_window(rgb, size, top, left, (336, 336), resample)
        window = pillow_resize_window(rgb, size, top, left, (336, 336), resample, full_limit=0)
        assert full.shape == (336, 336, 3)
        np.testing.assert_array_equal(window, full)


def test_new_sizes_reach_every_resize_path():
    """The sizes above exercise both pass orders and both one-direction paths of the native resampler."""
    paths = set()
    for h, w in SIZES:
        g = ops.preprocess_geometry((h, w))
        for oh, ow in (g["clip_resized"], g["sam_resized"]):
            if oh != h and ow != w:
                paths.add("vertical first" if pillow_vertical_first(h, w, oh, ow) else "horizontal first")
            elif oh != h:
                paths.add("height only")
            elif ow != w:
                paths.add("width only")
    assert paths == {"vertical first", "horizontal first", "height only", "width only"}, paths
