"""CUDA pre/post-processing kernels against the CPU kernels and PyTorch's CUDA ``interpolate`` pipeline, with GB/s
against the device's memory bandwidth. Part of benchmarks/gpu_check.sh; needs a GPU, legion_rt._C built with CUDA,
and PyTorch with CUDA (device buffers, CUDA events); without them it says what is missing and exits 0.

    python benchmarks/gpu_kernels.py [--repeats 50]

preprocess: uint8 RGB (1920x1080, 4000x3000) already on the device -> CLIP f32 [3,336,336] + SAM f32 [3,1024,1024]
    (ops.preprocess_cuda) vs ops.preprocess on the CPU (host input, all threads) vs PyTorch CUDA: float conversion,
    F.interpolate bicubic/bilinear (antialias) + crop/pad + normalize (not bit-identical to Pillow: a speed baseline).
postprocess: N=8 low-res masks f32 [8,256,256] -> masks [8,H,W] + union + boxes + areas at 1920x1080 and 3840x2160
    (ops.postprocess_masks_cuda) vs ops.postprocess_masks(with_stats) on the CPU vs PyTorch CUDA: SAM's two-stage
    F.interpolate(bilinear) + crop + ``> 0`` (masks only).
GB/s = bytes the fused kernel must read + write / its median time; the device's bandwidth: theoretical (memory clock
x bus width, when cuda-python reports them) and a measured device-to-device copy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def _cuda_ms(torch, fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _host_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _copy_gbps(torch, dev) -> float:
    """Device-to-device copy of 2 GiB: bytes read + written per second (GB/s)."""
    src = torch.empty(1 << 29, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    ms = _cuda_ms(torch, lambda: dst.copy_(src), 10)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def theoretical_gbps() -> float | None:
    """2 x memory clock x bus width (GB/s) from cuda-python's device attributes; None when not reported (CUDA 13
    dropped the memory clock attribute on some drivers)."""
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        try:
            from cuda import cudart as rt  # older cuda-python
        except ImportError:
            return None
    try:
        err, clock_khz = rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrMemoryClockRate, 0)
        err2, bus_bits = rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrGlobalMemoryBusWidth, 0)
    except AttributeError:
        return None
    if int(err) or int(err2) or not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    from legion_rt import ops

    if not ops.cuda_compiled():
        print("legion_rt._C was built without CUDA: nothing to time (see gpu_check.sh's build step)")
        return 0
    if not ops.cuda_available():
        print("no CUDA device: nothing to time")
        return 0
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("PyTorch is not installed: the timings need it for device buffers and CUDA events (not run)")
        return 0
    if not torch.cuda.is_available():
        print("PyTorch has no CUDA here: not run")
        return 0
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(0)
    theo = theoretical_gbps()
    measured = _copy_gbps(torch, dev)
    print(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}")
    print(
        f"bandwidth: theoretical {theo:.0f} GB/s" if theo else "bandwidth: theoretical not reported", end=""
    )
    print(f", measured device-to-device copy {measured:.0f} GB/s (read + write)")
    stream = torch.cuda.current_stream().cuda_stream
    ref_bw = theo or measured
    rows = []
    rng = np.random.default_rng(0)

    # ----------------------------------------------------------------------------------------- preprocess
    mean_c = torch.tensor(ops.CLIP_MEAN, device=dev).view(1, 3, 1, 1)
    std_c = torch.tensor(ops.CLIP_STD, device=dev).view(1, 3, 1, 1)
    mean_s = torch.tensor(ops.SAM_MEAN, device=dev).view(1, 3, 1, 1)
    std_s = torch.tensor(ops.SAM_STD, device=dev).view(1, 3, 1, 1)
    for H, W in ((1080, 1920), (3000, 4000)):
        rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        rgb_d = torch.from_numpy(rgb).to(dev)
        clip_d = torch.empty((3, 336, 336), dtype=torch.float32, device=dev)
        sam_d = torch.empty((3, 1024, 1024), dtype=torch.float32, device=dev)

        def ours(rgb_d=rgb_d, clip_d=clip_d, sam_d=sam_d, H=H, W=W):
            return ops.preprocess_cuda(rgb_d.data_ptr(), (H, W), clip_d.data_ptr(), sam_d.data_ptr(), stream)

        (sh, sw) = ours()
        torch.cuda.synchronize()
        clip_c, sam_c, _ = ops.preprocess(rgb)
        err_clip = float(np.abs(clip_d.cpu().numpy() - clip_c[0]).max())
        err_sam = float(np.abs(sam_d.cpu().numpy() - sam_c[0]).max())
        geo = ops.preprocess_geometry((H, W))
        ch, cw = geo["clip_resized"]
        oy, ox = geo["clip_crop_offset"]

        def torch_ref(rgb_d=rgb_d, ch=ch, cw=cw, oy=oy, ox=ox, sh=sh, sw=sw):
            x = rgb_d.permute(2, 0, 1)[None].float()
            c = F.interpolate(x, (ch, cw), mode="bicubic", antialias=True, align_corners=False)
            c = (c[..., oy : oy + 336, ox : ox + 336].clamp(0, 255).round() / 255 - mean_c) / std_c
            s = F.interpolate(x, (sh, sw), mode="bilinear", antialias=True, align_corners=False)
            s = (s.clamp(0, 255).round() - mean_s) / std_s
            out = torch.zeros((1, 3, 1024, 1024), device=dev)
            out[..., :sh, :sw] = s
            return c, out

        nbytes = H * W * 3 + 4 * 3 * (336 * 336 + 1024 * 1024)
        t = _cuda_ms(torch, ours, args.repeats)
        rows.append((f"preprocess {W}x{H}", t, _host_ms(lambda rgb=rgb: ops.preprocess(rgb), max(3, args.repeats // 10)),
                     _cuda_ms(torch, torch_ref, args.repeats), nbytes))  # fmt: skip
        print(f"preprocess {W}x{H}: CUDA vs CPU kernel max abs diff clip {err_clip:.3g}, sam {err_sam:.3g}")

    # ---------------------------------------------------------------------------------------- postprocess
    n = 8
    low = (rng.standard_normal((n, 256, 256)) * 4).astype(np.float32)
    low_d = torch.from_numpy(low).to(dev)
    for H, W in ((1080, 1920), (2160, 3840)):
        scale = 1024 / max(H, W)
        inp = (int(H * scale + 0.5), int(W * scale + 0.5))
        masks_d = torch.empty((n, H, W), dtype=torch.uint8, device=dev)
        union_d = torch.empty((H, W), dtype=torch.uint8, device=dev)
        boxes_d = torch.empty((n, 4), dtype=torch.int64, device=dev)
        areas_d = torch.empty((n,), dtype=torch.int64, device=dev)

        def ours(H=H, W=W, inp=inp, masks_d=masks_d, union_d=union_d, boxes_d=boxes_d, areas_d=areas_d):
            ops.postprocess_masks_cuda(low_d.data_ptr(), (n, 256, 256), inp, (H, W), masks_d.data_ptr(),
                                       union_d.data_ptr(), boxes_d.data_ptr(), areas_d.data_ptr(), stream)  # fmt: skip

        ours()
        torch.cuda.synchronize()
        masks_c, _union_c, boxes_c, areas_c = ops.postprocess_masks(low, inp, (H, W), True)
        same = bool(np.array_equal(masks_d.cpu().numpy().astype(bool), masks_c))
        same = (
            same
            and np.array_equal(boxes_d.cpu().numpy(), boxes_c)
            and np.array_equal(areas_d.cpu().numpy(), areas_c)
        )
        low_t = low_d[:, None]

        def torch_ref(H=H, W=W, inp=inp, low_t=low_t):
            x = F.interpolate(low_t, (1024, 1024), mode="bilinear", align_corners=False)
            x = F.interpolate(x[..., : inp[0], : inp[1]], (H, W), mode="bilinear", align_corners=False)
            return x[:, 0] > 0

        nbytes = low.nbytes + n * H * W + H * W + n * 40
        rows.append((f"postprocess N=8 -> {W}x{H}", _cuda_ms(torch, ours, args.repeats),
                     _host_ms(lambda inp=inp, H=H, W=W: ops.postprocess_masks(low, inp, (H, W), True), max(3, args.repeats // 10)),
                     _cuda_ms(torch, torch_ref, args.repeats), nbytes))  # fmt: skip
        print(f"postprocess {W}x{H}: CUDA masks/boxes/areas identical to the CPU kernel: {same}")
        if not same:
            print("MISMATCH: CUDA postprocess differs from the CPU kernel")
            return 1

    print(f"\n{'case':32s} {'CUDA ms':>9s} {'CPU ms':>9s} {'torch ms':>9s} {'x CPU':>7s} {'x torch':>8s} "
          f"{'GB/s':>7s} {'% of bw':>8s}")  # fmt: skip
    for name, t, cpu, ref, nbytes in rows:
        gbps = nbytes / (t * 1e-3) / 1e9
        print(f"{name:32s} {t:9.3f} {cpu:9.2f} {ref:9.3f} {cpu / t:7.1f} {ref / t:8.1f} {gbps:7.0f} "
              f"{100 * gbps / ref_bw:7.1f}%")  # fmt: skip
    print(f"(% of {'theoretical' if theo else 'measured copy'} bandwidth {ref_bw:.0f} GB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
