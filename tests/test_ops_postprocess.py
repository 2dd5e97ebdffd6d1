"""legion_rt.ops.postprocess_masks vs SAM's postprocess_masks (torch two-stage F.interpolate).

Measured on this machine (torch 2.13 CPU, AVX-512): 0 differing pixels over all cases below (the kernel
reproduces torch's fma source coordinate and blend order bit for bit). The issue's bound is 0.01%; we assert
that bound, and print the measured count.
"""

from __future__ import annotations

import numpy as np
import pytest

from legion_rt import ops

torch = pytest.importorskip("torch", reason="torch is the reference for postprocess parity (export extra)")
F = torch.nn.functional

MAX_DIFF_FRACTION = 1e-4  # issue bound (0.01%); measured 0


def reference_masks(low_res: np.ndarray, input_size, original_size) -> np.ndarray:
    """segment_anything Sam.postprocess_masks as LEGION uses it, then logit > 0. [N,256,256] -> bool [N,H,W]."""
    x = torch.from_numpy(low_res)[:, None]  # [N, 1, 256, 256]
    x = F.interpolate(x, (1024, 1024), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    x = F.interpolate(x, tuple(original_size), mode="bilinear", align_corners=False)
    return (x[:, 0] > 0).numpy()


def sam_input_size(h: int, w: int) -> tuple[int, int]:
    scale = 1024 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def random_logits(rng: np.random.Generator, n: int) -> np.ndarray:
    """Smooth blobs plus noise, so that masks have real edges and many near-zero logits."""
    coarse = rng.standard_normal((n, 32, 32)).astype(np.float32) * 4
    smooth = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)
    return np.ascontiguousarray(smooth + rng.standard_normal((n, 256, 256)).astype(np.float32))


def _cases():
    rng = np.random.default_rng(1234)
    fixed = [
        (0, 480, 640),
        (1, 1, 1),
        (8, 480, 640),
        (1, 4000, 3000),
        (1, 3000, 4000),
        (2, 4000, 7),
        (2, 7, 4000),
        (1, 2, 4000),
        (1, 4000, 2),
        (3, 1080, 1920),
        (1, 1024, 1024),
        (1, 1023, 1025),
        (8, 333, 500),
        (1, 2, 3),
        (1, 4000, 600),
        (1, 1000, 1),  # input (1024, 1): stage 2 changes the height only
        (1, 1, 1000),  # input (1, 1024): the width only
        (1, 4320, 7680),  # 8K
        (2, 70000, 40),  # taller than 65535 rows (CUDA's gridDim.y limit); input (1024, 1)
    ]
    cases = list(fixed)
    while len(cases) < len(fixed) + 12:
        n = int(rng.choice([1, 2, 3, 8]))
        h, w = (int(v) for v in rng.integers(1, 2500, size=2))
        if rng.random() < 0.3:  # extreme aspect ratio
            w = max(1, h // int(rng.integers(20, 200)))
        if min(sam_input_size(h, w)) > 0:  # thinner pictures have an empty SAM crop (tested below)
            cases.append((n, h, w))
    return cases


CASES = _cases()


@pytest.mark.parametrize(("n", "h", "w"), CASES, ids=[f"N{n}-{h}x{w}" for n, h, w in CASES])
def test_matches_torch_two_stage(n, h, w):
    torch.set_num_threads(1)
    rng = np.random.default_rng(n * 100003 + h * 7919 + w)
    low = random_logits(rng, n)
    inp = sam_input_size(h, w)
    got = ops.postprocess_masks(low, inp, (h, w))
    assert got.dtype == np.bool_ and got.shape == (n, h, w)
    ref = reference_masks(low, inp, (h, w))
    diff = int((got != ref).sum())
    if diff:
        print(f"N={n} {h}x{w}: {diff} of {ref.size} pixels differ")
    assert diff <= MAX_DIFF_FRACTION * max(ref.size, 1)


@pytest.mark.parametrize(
    ("n", "h", "w"), [(0, 50, 60), (1, 1, 1), (8, 480, 640), (3, 97, 2000), (3, 70000, 40)]
)
def test_stats_match_masks(n, h, w):
    rng = np.random.default_rng(7)
    low = random_logits(rng, n)
    if n >= 3:
        low[1] = -5.0  # an empty mask -> bbox (0, 0, 0, 0), area 0
        low[2] = 5.0  # a full mask -> bbox (0, 0, w, h)
    inp = sam_input_size(h, w)
    masks, union, bboxes, areas = ops.postprocess_masks(low, inp, (h, w), with_stats=True)
    np.testing.assert_array_equal(masks, ops.postprocess_masks(low, inp, (h, w)))
    assert union.dtype == np.bool_ and union.shape == (h, w)
    assert bboxes.dtype == np.int64 and bboxes.shape == (n, 4)
    assert areas.dtype == np.int64 and areas.shape == (n,)
    np.testing.assert_array_equal(union, masks.any(axis=0) if n else np.zeros((h, w), bool))
    for i in range(n):
        m = masks[i]
        assert areas[i] == int(m.sum())
        if not m.any():
            assert tuple(bboxes[i]) == (0, 0, 0, 0)
            continue
        ys, xs = np.nonzero(m)
        assert tuple(bboxes[i]) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    if n >= 3:
        assert tuple(bboxes[1]) == (0, 0, 0, 0) and areas[1] == 0
        assert tuple(bboxes[2]) == (0, 0, w, h) and areas[2] == h * w


def test_thread_counts_agree():
    rng = np.random.default_rng(3)
    low = random_logits(rng, 3)
    outs = [
        ops.postprocess_masks(low, (768, 1024), (601, 803), with_stats=True, num_threads=t) for t in (1, 2, 5)
    ]
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


def test_without_fma_pixels_flip():
    """The pitfall the kernel guards against: a plain multiply-add source coordinate changes the result.
    float32 emulation of torch's stage-1 coordinate with and without fma on the 256 -> 1024 axis."""
    scale = np.float32(256 / 1024)
    dst = np.arange(1024, dtype=np.float32) + np.float32(0.5)
    plain = scale * dst - np.float32(0.5)  # two roundings
    fused = (scale.astype(np.float64) * dst.astype(np.float64) - 0.5).astype(
        np.float32
    )  # one rounding (exact product)
    # With scale = 1/4 both are exact, so the coordinate pitfall only appears for non-power-of-two scales:
    scale2 = np.float32(768 / 1080)
    dst2 = np.arange(1080, dtype=np.float32) + np.float32(0.5)
    plain2 = scale2 * dst2 - np.float32(0.5)
    fused2 = (scale2.astype(np.float64) * dst2.astype(np.float64) - 0.5).astype(np.float32)
    assert np.array_equal(plain, fused)
    assert not np.array_equal(plain2, fused2)  # so fma vs no-fma is observable for real sizes


def test_empty_sam_crop_is_a_request_error():
    """A 1x4000 picture resizes to h' = int(0.256 + 0.5) = 0 rows: torch's reference fails on the empty crop;
    the kernel refuses input_size 0 with a typed error naming the argument."""
    from legion_rt.errors import RequestError

    assert sam_input_size(1, 4000) == (0, 1024)
    with pytest.raises(RequestError, match=r"input_size\[0\] \(height\) must be > 0"):
        ops.postprocess_masks(np.zeros((1, 256, 256), np.float32), (0, 1024), (1, 4000))
