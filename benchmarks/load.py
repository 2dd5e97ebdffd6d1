"""Peak memory of loading a checkpoint: peak RSS / checkpoint bytes (target <= 1.3).

Writes a synthetic checkpoint of about 1 GB in the released layout (bf16, two `.bin` shards + index, real key
families: LLaMA layers, projector, text_hidden_fcs, SAM, region_encoder, rotary inv_freq; dims scaled down),
then loads it with export.checkpoint.load_legion in a fresh process per target dtype and reads the kernel's
peak RSS (VmHWM).

    python benchmarks/load.py [--dir /tmp/legion-load-bench] [--gb 1.0] [--keep]

Reported per dtype:
- peak_rss_over_ckpt = (VmHWM - RSS before loading) / checkpoint bytes: what loading itself costs (the
  interpreter + torch + transformers baseline, ~0.4 GB, is the same for a 16.75 GB checkpoint and is not part
  of the loader's footprint);
- raw_peak_over_ckpt = VmHWM / checkpoint bytes, baseline included;
- model_over_ckpt = bytes of the loaded model / checkpoint bytes (1.0 into bf16, 2.0 into fp32: the floor).

Measured (2 CPU cores, 1.022 GB checkpoint, torch 2.13, transformers 5.24, 2026-11-28):
    into bf16: peak_rss_over_ckpt 1.014 (raw 1.400 with the 0.395 GB interpreter baseline), 2.5 s
    into fp32: peak_rss_over_ckpt 2.013 (model alone 2.001), 2.3 s
    ablation --no-drop-pages, into bf16: 1.54 (the mmap'd pages of a shard stay resident until it is released)
So the real 16.75 GB bf16 checkpoint loads into bf16 with ~17.0 GB + baseline; into fp32 it needs 33.5 GB of
model alone (does not fit a 24 GB machine whatever the loader does).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def bench_config(gb: float):
    from legion_rt.export.config import CONFIGS

    # LLaMA-shaped LLM with the real vocabulary; layers chosen so the checkpoint is about `gb` GB of bf16.
    hidden, mlp, vocab = 1280, 3456, 32007
    per_layer = 4 * hidden * hidden + 3 * hidden * mlp
    layers = max(2, round((gb * 1e9 / 2 - 2 * vocab * hidden) / per_layer))
    return CONFIGS["tiny"].replace(
        name="bench", vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=10, num_kv_heads=10,
        intermediate_size=mlp, sam_embed_dim=256, sam_depth=4, sam_num_heads=8, sam_global_attn_indexes=(1, 3),
    )  # fmt: skip


def write_checkpoint(out: Path, gb: float) -> int:
    """The synthetic checkpoint (+ a tiny CLIP directory). Returns the checkpoint's weight bytes."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from legion_rt.export.model.legion import LegionModel
    from legion_rt.export.tiny import (
        _region_encoder_tensors,
        _to_ckpt_key,
        checkpoint_config_json,
        clip_config_json,
    )

    cfg = bench_config(gb)
    ckpt, clip = out / "checkpoint", out / "clip"
    ckpt.mkdir(parents=True, exist_ok=True)
    clip.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LegionModel(cfg).state_dict().items()}
    keys = {_to_ckpt_key(k): s for k, s in shapes.items() if _to_ckpt_key(k) is not None}
    gen = torch.Generator().manual_seed(0)
    for i in range(cfg.num_layers):
        keys[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = (cfg.head_dim // 2,)
    half = cfg.num_layers // 2
    names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]

    def shard_of(key: str) -> int:
        if key.startswith("model.embed_tokens."):
            return 0
        if key.startswith("model.layers."):
            return 0 if int(key.split(".")[2]) < half else 1
        return 1

    weight_map, total = {}, 0
    for s, name in enumerate(names):  # one shard in memory at a time
        shard = {}
        for key, shape in keys.items():
            if shard_of(key) == s:
                t = torch.empty(shape, dtype=torch.bfloat16)
                t.normal_(0, 0.02, generator=gen)
                shard[key] = t
        if s == 1:
            shard.update({k: v.bfloat16() for k, v in _region_encoder_tensors(gen).items()})
        torch.save(shard, ckpt / name)
        weight_map.update({k: name for k in shard})
        total += sum(v.numel() * v.element_size() for v in shard.values())
        del shard
    (ckpt / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    (ckpt / "config.json").write_text(json.dumps(checkpoint_config_json(cfg), indent=1))
    ccfg = clip_config_json(cfg)
    (clip / "config.json").write_text(json.dumps(ccfg))
    vc = CLIPVisionConfig(**{k: v for k, v in ccfg["vision_config"].items() if k != "model_type"})
    torch.save(
        {"vision_model." + k: v for k, v in CLIPVisionModel(vc).state_dict().items()},
        clip / "pytorch_model.bin",
    )
    return total


def measure(out: Path, dtype_name: str, drop_pages: bool = True) -> dict:
    """Run in a fresh process: load and report peak RSS."""
    import torch
    from transformers import CLIPVisionModel, LlamaForCausalLM  # noqa: F401

    import legion_rt.export.checkpoint as ck
    import legion_rt.export.model.legion  # noqa: F401  (imports transformers' CLIP and LLaMA before the baseline)

    torch.set_num_threads(2)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    if not drop_pages:  # ablation: keep the mmap'd source pages resident until each shard is released
        ck._drop_pages = lambda t: None
    before = _status("VmRSS")
    t0 = time.perf_counter()
    model = ck.load_legion(out / "checkpoint", out / "clip", dtype=dtype)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "dtype": dtype_name,
        "rss_before": before,
        "peak_rss": peak,
        "model_bytes": model_bytes,
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/legion-load-bench"))
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    ap.add_argument("--measure", choices=["bf16", "fp32"], help=argparse.SUPPRESS)
    ap.add_argument(
        "--no-drop-pages", action="store_true", help="ablation: do not madvise the source pages away"
    )
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.dir, args.measure, drop_pages=not args.no_drop_pages)))
        return
    if args.dir.exists():
        shutil.rmtree(args.dir)
    # Write in a child process so the writer's memory never mixes with the measurement.
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.load import write_checkpoint; from pathlib import Path; print(write_checkpoint(Path({str(args.dir)!r}), {args.gb}))"
    ckpt_bytes = int(
        subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True
        ).stdout.split()[-1]
    )
    print(f"synthetic checkpoint: {ckpt_bytes / 1e9:.3f} GB of bf16 in {args.dir / 'checkpoint'}")
    try:
        for dtype in ("bf16", "fp32"):
            cmd = [sys.executable, __file__, "--dir", str(args.dir), "--measure", dtype]
            cmd += ["--no-drop-pages"] if args.no_drop_pages else []
            res = subprocess.run(cmd, check=True, capture_output=True, text=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            print(
                f"load into {dtype}: {r['seconds']:.1f} s, peak RSS {r['peak_rss'] / 1e9:.3f} GB "
                f"(baseline {r['rss_before'] / 1e9:.3f} GB); "
                f"peak_rss_over_ckpt = {(r['peak_rss'] - r['rss_before']) / ckpt_bytes:.3f}, "
                f"raw_peak_over_ckpt = {r['peak_rss'] / ckpt_bytes:.3f}, model_over_ckpt = {r['model_bytes'] / ckpt_bytes:.3f}"
            )
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
