"""End-to-end benchmark: legion_rt vs the reference pipeline, per stage, in one run.

    python benchmarks/e2e.py [--size small] [--tokens 128] [--threads 2] [--json out.json] [--markdown]

Setup: ``make_tiny(size=...)`` (random weights, cached under $LEGION_RT_CACHE or ~/.cache/legion_rt/bench),
exported to fp32 artifacts; the bundled demo picture (640x448); ``--tokens`` new tokens forced (EOS ignored, so
every run does the same work); ``--threads`` threads for ONNX Runtime (per session), PyTorch and the native
kernels.

Compared:
  legion_rt  Engine on ONNX Runtime CPU (KV cache written in place, prefix KV reused, SAM encoder concurrent).
  (b)        export.reference with ``use_kv_cache=True``: eager PyTorch fp32 with transformers' DynamicCache.
  (a)        export.reference with ``use_kv_cache=False``: as the original runs (whole sequence and CLIP every step).
             It is quadratic: when ``--tokens`` steps would take longer than ``--max-a-seconds``, it runs
             ``--a-tokens`` steps and extrapolates the decode time from the step costs measured at the start and
             the end of that run (a straight line in the sequence length, which is how a no-cache step grows);
             the table says when a number is extrapolated.

Stages (seconds unless noted): preprocess (decode + both resizes), vision (CLIP + projector + detector), sam_encoder,
prefill (first LLM pass), ms/token (decode steps only), masks, time to first token / first mask, total.
Also measured: ms/token of legion_rt's LLM at context 1024 vs 128 (the KV cache must not be copied per step), and
the decode's bytes read per token (weights + KV cache) against the measured memory copy bandwidth (the roof).
Median of ``--repeat`` runs after one warm-up run for legion_rt and (b); one run for (a).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ["preprocess", "vision", "sam_encoder", "prefill", "ms_per_token", "masks", "time_to_first_token",
          "time_to_first_mask", "total"]  # fmt: skip


def _cache() -> Path:
    return Path(os.environ.get("LEGION_RT_CACHE") or Path.home() / ".cache" / "legion_rt") / "bench"


def build(size: str, seed: int, verify: bool = True) -> tuple[object, Path]:
    """make_tiny + export once (cached)."""
    from legion_rt.artifacts import load_artifacts
    from legion_rt.errors import ArtifactError
    from legion_rt.export.onnx_export import export_artifacts
    from legion_rt.export.tiny import make_tiny

    root = _cache()
    ckpt, art = root / f"{size}-seed{seed}", root / f"{size}-seed{seed}-art"
    paths = make_tiny(ckpt, seed=seed, size=size)  # cheap next to the benchmark; gives the paths object
    try:
        load_artifacts(art, verify="size")
    except ArtifactError:
        export_artifacts(
            checkpoint=paths.checkpoint,
            clip=paths.clip,
            detector=paths.detector,
            out=art,
            progress=False,
            verify=verify,
        )
    return paths, art


def copy_bandwidth(nbytes: int = 512 * 1024**2, repeat: int = 5) -> float:
    """Measured memory copy bandwidth, bytes/s counted as read + written (numpy copyto of a large array)."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def llm_bytes_per_token(manifest, context: int) -> int:
    """Bytes a decode step must read: every LLM weight used per token (not the embedding table: one row) plus the
    K and V cache of ``context`` positions. ``manifest``: the typed manifest (legion_rt.manifest.Manifest)."""
    m = manifest.model
    H, L, V, inter = m.hidden_size, m.num_layers, m.vocab_size, m.intermediate_size
    kvh, d, nh = m.num_kv_heads, m.head_dim, m.num_heads
    wbytes = {"fp32": 4, "fp16": 2, "int8": 1, "int4": 0.5}[manifest.precision]
    per_layer = H * (nh * d) + 2 * H * (kvh * d) + (nh * d) * H + 3 * H * inter + 2 * H
    weights = int((L * per_layer + H + V * H) * wbytes)  # + final norm + lm_head
    kv_bytes = 4 if manifest.graphs.llm.kv_dtype == "float32" else 2
    kv = 2 * L * kvh * d * context * kv_bytes
    return weights + kv


def ms_per_token_at(engine, context: int, steps: int = 48) -> float:
    """Median ms of one LLM decode step after ``context`` cached positions (random embeddings)."""
    llm = engine._backend.llm
    H = engine.hidden_size
    rng = np.random.default_rng(0)
    cache = llm.new_cache(context + steps + 1)
    llm.forward(cache, rng.standard_normal((1, context, H), dtype=np.float32) * 0.02)
    one = rng.standard_normal((1, 1, H), dtype=np.float32) * 0.02
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        llm.forward(cache, one)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def run_legion(art: Path, picture: Path, tokens: int, threads: int, repeat: int) -> tuple[dict, object]:
    from legion_rt.engine import Engine

    eng = Engine(art, backend="onnxruntime", providers=["cpu"], threads=threads)
    eng.analyze(picture, max_new_tokens=tokens, ignore_eos=True)  # warm-up
    runs = [eng.analyze(picture, max_new_tokens=tokens, ignore_eos=True).timings for _ in range(repeat)]
    return {k: statistics.median(r.get(k, float("nan")) for r in runs) for k in STAGES}, eng


def run_reference(paths, picture: Path, tokens: int, threads: int, repeat: int, use_kv_cache: bool) -> dict:
    import torch

    from legion_rt.export.reference import ReferencePipeline

    torch.set_num_threads(threads)
    ref = ReferencePipeline.from_checkpoint(paths.checkpoint, paths.clip, paths.detector)
    if use_kv_cache:
        ref.run(picture, max_new_tokens=tokens, use_kv_cache=True, ignore_eos=True)  # warm-up
    runs = [
        ref.run(picture, max_new_tokens=tokens, use_kv_cache=use_kv_cache, ignore_eos=True).timings
        for _ in range(repeat)
    ]
    return {k: statistics.median(r.get(k, float("nan")) for r in runs) for k in STAGES}


def run_nocache(
    paths, picture: Path, tokens: int, threads: int, a_tokens: int, max_seconds: float, kv: dict
) -> dict:
    """(a): the full run when it fits in ``max_seconds``; else a run of ``a_tokens`` steps fits the per-step cost
    c * (P + k) (a no-cache step processes the whole sequence) and the decode of ``tokens`` steps is
    extrapolated. The masks of (a) are made by the same code as (b)'s, after generation, from the same tokens:
    an extrapolated (a) takes (b)'s mask time."""
    import torch

    from legion_rt.export.reference import ReferencePipeline

    torch.set_num_threads(threads)
    ref = ReferencePipeline.from_checkpoint(paths.checkpoint, paths.clip, paths.detector)
    probe = ref.run(picture, max_new_tokens=2, use_kv_cache=False, ignore_eos=True).timings
    est = (probe["prefill"] + probe["decode"]) * tokens * 1.3  # steps grow with length: margin for it
    if est <= max_seconds:
        t = ref.run(picture, max_new_tokens=tokens, use_kv_cache=False, ignore_eos=True).timings
        out = {k: t.get(k, float("nan")) for k in STAGES}
        out["extrapolated"] = False
        return out
    n = max(3, a_tokens)
    t2 = ref.run(picture, max_new_tokens=n, use_kv_cache=False, ignore_eos=True).timings
    # A no-cache step k runs the whole sequence of P + k positions (P = prompt length): cost ~ c * (P + k).
    # One parameter fitted on the measured steps (robust to noise; the attention's quadratic part is ignored, so
    # this slightly underestimates (a)).
    P = ref.prompt_length
    c = t2["decode"] / sum(P + k for k in range(1, n))
    decode = c * sum(P + k for k in range(1, tokens))
    out = {k: t2.get(k, float("nan")) for k in STAGES}
    out["ms_per_token"] = 1000 * decode / (tokens - 1)
    out["masks"] = kv["masks"]
    out["total"] = (
        out["preprocess"] + out["vision"] + out["prefill"] + decode + out["sam_encoder"] + out["masks"]
    )
    out["time_to_first_mask"] = out["total"]  # masks come after the whole generation, as in the original
    out["extrapolated"] = True
    out["measured_tokens"] = n
    return out


def fmt(v, ms=False) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    return f"{v:.2f}" if ms else f"{v:.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=["tiny", "small"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--a-tokens", type=int, default=32, help="steps actually run for (a) when extrapolating")
    ap.add_argument("--max-a-seconds", type=float, default=300.0)
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--no-export-verify", action="store_true", help="export without the ORT-vs-PyTorch check")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", action="store_true", help="print the README table")
    args = ap.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import legion_rt.ops as ops

    ops.set_num_threads(args.threads)
    picture = REPO / "legion_rt" / "assets" / "demo.jpg"
    paths, art = build(args.size, args.seed, verify=not args.no_export_verify)
    print(
        f"model: {args.size} (random weights), artifacts {art}; picture {picture.name}; {args.tokens} tokens forced; "
        f"{args.threads} threads",
        flush=True,
    )

    legion, eng = run_legion(art, picture, args.tokens, args.threads, args.repeat)
    print("legion_rt done", flush=True)
    kv = run_reference(paths, picture, args.tokens, args.threads, args.repeat, use_kv_cache=True)
    print("(b) eager PyTorch + KV cache done", flush=True)
    nocache = None
    if not args.skip_a:
        nocache = run_nocache(
            paths, picture, args.tokens, args.threads, args.a_tokens, args.max_a_seconds, kv
        )
        print("(a) reference without KV cache done", flush=True)

    ms128 = ms_per_token_at(eng, 128)
    ms1024 = ms_per_token_at(eng, 1024)
    bw = copy_bandwidth()
    prompt = eng.prompt_length
    mid_ctx = prompt + args.tokens // 2
    bytes_tok = llm_bytes_per_token(eng.art.manifest, mid_ctx)
    roof_ms = 1000 * bytes_tok / bw

    rows = []
    for k in STAGES:
        a = nocache.get(k) if nocache else None
        b, lg = kv.get(k), legion.get(k)
        ms = k == "ms_per_token"
        rows.append((k, fmt(lg, ms), fmt(b, ms), fmt(a, ms),
                     fmt(b / lg, True) if b and lg else "-", fmt(a / lg, True) if a and lg else "-"))  # fmt: skip
    head = ("stage", "legion_rt", "(b) torch+KV", "(a) no-cache", "x vs (b)", "x vs (a)")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(6)]
    print()
    for r in [head, *rows]:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)))
    if nocache and nocache.get("extrapolated"):
        print(
            f"(a) decode extrapolated from a run of {nocache['measured_tokens']} tokens (step cost proportional "
            "to the sequence length); its masks taken from (b) (same code, same tokens)"
        )
    print(f"\nLLM ms/token at context 128: {ms128:.2f}, at 1024: {ms1024:.2f}, ratio {ms1024 / ms128:.2f}")
    roof1024 = 1000 * llm_bytes_per_token(eng.art.manifest, 1024) / bw
    print(
        f"decode bytes read per token at context {mid_ctx}: {bytes_tok / 1e6:.1f} MB; copy bandwidth "
        f"{bw / 1e9:.1f} GB/s -> roof {roof_ms:.2f} ms/token; measured in analyze {legion['ms_per_token']:.2f} "
        f"ms/token ({100 * roof_ms / legion['ms_per_token']:.0f}% of roof; the SAM encoder and mask jobs share "
        f"the cores meanwhile); LLM alone at context 1024: {ms1024:.2f} ms vs roof {roof1024:.2f} ms "
        f"({100 * roof1024 / ms1024:.0f}% of roof)"
    )

    info = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "size": args.size, "tokens": args.tokens, "threads": args.threads, "prompt_length": prompt,
        "legion_rt": legion, "torch_kv": kv, "nocache": nocache,
        "ms_per_token_ctx128": ms128, "ms_per_token_ctx1024": ms1024,
        "bytes_per_token": bytes_tok, "copy_bandwidth": bw, "roof_ms_per_token": roof_ms, "roof_ms_ctx1024": roof1024,
    }  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2, default=float))
    if args.markdown:
        print(
            "\n| stage | legion_rt | (b) eager PyTorch + KV | (a) no-cache (original) | x vs (b) | x vs (a) |"
        )
        print("|---|---|---|---|---|---|")
        for r in rows:
            unit = " ms" if r[0] == "ms_per_token" else " s"
            print(f"| {r[0]} | {r[1]}{unit} | {r[2]}{unit} | {r[3]}{unit} | {r[4]} | {r[5]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
