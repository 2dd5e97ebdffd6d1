"""Kernel benchmarks: legion_rt.ops vs the reference implementations (one run, ratios, not a timed test).

    python benchmarks/kernels.py [--threads 2] [--repeats 15]

postprocess_masks (N=8 low-res masks -> 1920x1080 and 3840x2160):
    torch: SAM's two-stage F.interpolate(bilinear) + crop + `> 0` (torch.set_num_threads(threads));
    OpenCV: per mask cv2.resize INTER_LINEAR to 1024x1024, crop, cv2.resize to (W, H), `> 0`.
preprocess (1920x1080 and 4000x3000 RGB): Pillow resizes (bicubic + crop, bilinear) + numpy normalization
    exactly as the reference does it.
Reports medians, speedups and achieved GB/s (bytes read + written by the fused kernel / its median time).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def bench_postprocess(low, n, H, W, repeats, ops, torch, F, cv2):
    """One postprocess row: (name, ours ms, torch ms, OpenCV ms, bytes, ours-with-stats ms)."""
    scale = 1024 / max(H, W)
    inp = (int(H * scale + 0.5), int(W * scale + 0.5))

    def ours():
        return ops.postprocess_masks(low, inp, (H, W))

    def ours_stats():
        return ops.postprocess_masks(low, inp, (H, W), with_stats=True)

    low_t = torch.from_numpy(low)[:, None]

    def torch_ref():
        x = F.interpolate(low_t, (1024, 1024), mode="bilinear", align_corners=False)
        x = x[..., : inp[0], : inp[1]]
        x = F.interpolate(x, (H, W), mode="bilinear", align_corners=False)
        return (x[:, 0] > 0).numpy()

    def cv2_ref():
        out = np.empty((n, H, W), bool)
        for i in range(n):
            x = cv2.resize(low[i], (1024, 1024), interpolation=cv2.INTER_LINEAR)[: inp[0], : inp[1]]
            out[i] = cv2.resize(x, (W, H), interpolation=cv2.INTER_LINEAR) > 0
        return out

    assert np.array_equal(ours(), torch_ref())
    t_ours = median_ms(ours, repeats)
    t_stats = median_ms(ours_stats, repeats)
    t_torch = median_ms(torch_ref, max(3, repeats // 3))
    t_cv2 = median_ms(cv2_ref, max(3, repeats // 3))
    nbytes = low.nbytes + n * H * W  # logits read + bool masks written
    return (f"postprocess N=8 -> {W}x{H}", t_ours, t_torch, t_cv2, nbytes, t_stats)


def bench_preprocess(rgb, H, W, repeats, ops, Image, clip_mean, clip_std, sam_mean, sam_std):
    """One preprocess row: (name, ours ms, Pillow+numpy ms, None, bytes, None)."""

    def ours_pre():
        return ops.preprocess(rgb)

    def pillow_numpy():
        img = Image.fromarray(rgb)
        short, long = min(H, W), max(H, W)
        nl = int(336 * long / short)
        size = (nl, 336) if W <= H else (336, nl)
        a = np.asarray(img.resize((size[1], size[0]), Image.BICUBIC))
        top, left = (size[0] - 336) // 2, (size[1] - 336) // 2
        a = a[top : top + 336, left : left + 336]
        clip = ((a * (1 / 255)).astype(np.float32) - clip_mean) / clip_std
        clip = clip.transpose(2, 0, 1)[None]
        s = 1024 / max(H, W)
        nh, nw = int(H * s + 0.5), int(W * s + 0.5)
        b = np.asarray(img.resize((nw, nh), Image.BILINEAR))
        sam = np.zeros((1, 3, 1024, 1024), np.float32)
        sam[0, :, :nh, :nw] = ((b.astype(np.float32) - sam_mean) / sam_std).transpose(2, 0, 1)
        return clip, sam

    ref = pillow_numpy()
    got = ours_pre()
    assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])
    t_ours = median_ms(ours_pre, repeats)
    t_ref = median_ms(pillow_numpy, max(3, repeats // 3))
    nbytes = rgb.nbytes + got[0].nbytes + got[1].nbytes
    return (f"preprocess {W}x{H}", t_ours, t_ref, None, nbytes, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()

    import cv2
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from legion_rt import ops

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    ops.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []

    # ---------------------------------------------------------------- postprocess
    n = 8
    low = np.ascontiguousarray(
        np.repeat(np.repeat(rng.standard_normal((n, 32, 32)) * 4, 8, 1), 8, 2).astype(np.float32)
        + rng.standard_normal((n, 256, 256)).astype(np.float32)
    )
    for H, W in [(1080, 1920), (2160, 3840)]:
        rows.append(bench_postprocess(low, n, H, W, args.repeats, ops, torch, F, cv2))

    # ---------------------------------------------------------------- preprocess
    clip_mean = np.array(ops.CLIP_MEAN, np.float32)
    clip_std = np.array(ops.CLIP_STD, np.float32)
    sam_mean = np.array(ops.SAM_MEAN, np.float32)
    sam_std = np.array(ops.SAM_STD, np.float32)
    for H, W in [(1080, 1920), (3000, 4000)]:
        rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        rows.append(
            bench_preprocess(rgb, H, W, args.repeats, ops, Image, clip_mean, clip_std, sam_mean, sam_std)
        )

    print(
        f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs visible, threads={args.threads}; "
        f"numpy {np.__version__}, torch {torch.__version__}, opencv {cv2.__version__}, "
        f"Pillow {Image.__version__}"
    )
    print()
    print("| kernel | legion_rt ms | reference ms | speedup | OpenCV ms | vs OpenCV | legion_rt GB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, t_ours, t_ref, t_cv2, nbytes, t_stats in rows:
        ref_name = "torch" if name.startswith("post") else "Pillow+numpy"
        cv = f"{t_cv2:.1f} | {t_cv2 / t_ours:.1f}x" if t_cv2 is not None else "- | -"
        extra = f" (with stats {t_stats:.1f} ms)" if t_stats is not None else ""
        print(
            f"| {name}{extra} | {t_ours:.1f} | {t_ref:.1f} ({ref_name}) | {t_ref / t_ours:.1f}x | {cv} | "
            f"{nbytes / (t_ours * 1e-3) / 1e9:.2f} |"
        )


if __name__ == "__main__":
    main()
