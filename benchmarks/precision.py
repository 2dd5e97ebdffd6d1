"""Precision benchmark: fp16, int8 and int4 against fp32 (accuracy), and decode speed / llm.onnx size.

    python benchmarks/precision.py accuracy [--size tiny] [--seeds 0 1] [--steers loop free] [--tokens 128]
    python benchmarks/precision.py speed [--sizes small medium] [--threads 2] [--steps 48]

accuracy: for each make_tiny model (seed x steer), one export per precision (``verify=False``: the export's own
checks are tested in tests/test_precision.py; here only the outputs are compared) and the same pictures (the bundled
demo picture and two synthetic ones). Per precision and picture, against fp32:

* free-running: ``Engine.analyze(max_new_tokens=--tokens, ignore_eos=True)``: the step of the first divergent token,
  the share of identical tokens over the --tokens positions, the IoU of every [SEG] mask whose [SEG] comes before
  the first divergence (same [SEG] index), verdict agreement and |p(fake) - p(fake) fp32|;
* teacher-forced: the precision's LLM fed the fp32 tokens: the steps where its argmax differs from fp32's, with
  fp32's top-2 logit margin at each of them (the margins of random-weight models are small, so a divergence says
  more about the model than about the method); the median fp32 margin over all steps for scale.

speed: the LLM graph alone (``OrtLLM``, ``--threads`` threads, CPU provider), built from a random
LlamaForCausalLM of the registry size (``small``: ~100 MB fp32, inside no cache but close to it; ``medium``: ~600 MB
fp32, 20x the 32 MiB L3, bandwidth-bound as the 7B is), in fp32, fp16 (where the CPU provider runs it), int8 and
int4 (export/quantize.py defaults), and int8/int4 with MatMulNBits ``accuracy_level`` 4 (int8 compute). Decode
ms/token: median of ``--steps`` steps after a 32-position prefill, best of ``--rounds`` interleaved rounds;
achieved GB/s = llm.onnx bytes / (ms/token) against the measured read bandwidth (numpy sum of a 1 GiB array on
``--threads`` threads, the roof).

Accuracy on the real LEGION checkpoint is not measured here (no checkpoint on this machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRECISIONS = ("fp32", "fp16", "int8", "int4")
CACHE = Path(os.environ.get("LEGION_RT_CACHE", Path.home() / ".cache" / "legion_rt")) / "bench-precision"


# ------------------------------------------------------------------------------------------------- accuracy
def pictures() -> dict[str, np.ndarray]:
    from legion_rt.image import load_image

    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:480, 0:640]
    grad = np.stack([xx * 255 // 639, yy * 255 // 479, (xx + yy) * 255 // 1118], -1).astype(np.uint8)
    return {
        "demo.jpg": load_image(REPO / "legion_rt" / "assets" / "demo.jpg"),
        "noise": rng.integers(0, 256, (512, 384, 3), dtype=np.uint8),
        "gradient": grad,
    }


def teacher_forced(eng, rgb, tokens: list[int]):
    """The engine's LLM over ``rgb``'s prompt, fed ``tokens``: (argmax per step, logits per step)."""
    clip_px = eng._preprocess(rgb)[0]  # (clip, sam, (h, w))
    image_embeds, _ = eng._backend.vision(clip_px)
    llm = eng._backend.llm
    cache = llm.clone_cache(eng._prefix_cache, eng.prompt_length + len(tokens) + 1)
    first = np.concatenate(
        [
            np.asarray(image_embeds, np.float32).reshape(1, -1, eng.hidden_size),
            eng._embed_ids(eng.suffix_ids),
        ],
        1,
    )
    logits, _ = llm.forward(cache, first)
    out = [np.asarray(logits, np.float64).reshape(-1)]
    for t in tokens[:-1]:
        logits, _ = llm.forward(cache, eng._embed_ids([t]))
        out.append(np.asarray(logits, np.float64).reshape(-1))
    out = np.stack(out)
    return out.argmax(-1), out


def _iou(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 1.0


def accuracy(args) -> dict:
    import legion_rt
    from legion_rt.export.onnx_export import export_artifacts
    from legion_rt.export.tiny import make_tiny

    pics = pictures()
    rows = []
    for steer in args.steers:
        for seed in args.seeds:
            base = CACHE / f"{args.size}-{steer}-{seed}"
            paths = make_tiny(base / "ckpt", seed=seed, size=args.size, steer=steer)
            arts = {}
            for p in PRECISIONS:
                out = base / p
                if not (out / "manifest.json").is_file():
                    export_artifacts(checkpoint=paths.checkpoint, clip=paths.clip, detector=paths.detector,
                                     out=out, precision=p, progress=False, verify=False)  # fmt: skip
                arts[p] = out
            results, forced = {}, {}
            for p in PRECISIONS:
                try:
                    with legion_rt.Engine(arts[p], threads=args.threads) as eng:
                        for name, rgb in pics.items():
                            results[p, name] = eng.analyze(rgb, max_new_tokens=args.tokens, ignore_eos=True)
                        for name, rgb in pics.items():
                            ref = results.get(("fp32", name))
                            toks = ref.token_ids if ref is not None else results[p, name].token_ids
                            forced[p, name] = teacher_forced(eng, rgb, list(toks))
                except Exception as err:  # noqa: BLE001 - fp16 graphs the CPU provider cannot run
                    print(f"{args.size} {steer} seed {seed} {p}: not run ({str(err).splitlines()[0][:120]})")
                    for name in pics:
                        results.pop((p, name), None)
            for p in PRECISIONS[1:]:
                for name in pics:
                    if (p, name) not in results:
                        rows.append({"size": args.size, "steer": steer, "seed": seed, "precision": p,
                                     "picture": name, "ran": False})  # fmt: skip
                        continue
                    ref, got = results["fp32", name], results[p, name]
                    a, b = list(ref.token_ids), list(got.token_ids)
                    n = min(len(a), len(b), args.tokens)
                    diff = [i for i in range(n) if a[i] != b[i]]
                    first = diff[0] if diff else None
                    same = sum(a[i] == b[i] for i in range(n)) / max(n, 1)
                    ref_arg, ref_logits = forced["fp32", name]
                    got_arg, _ = forced[p, name]
                    top2 = np.sort(ref_logits, -1)[:, -2:]
                    margins = top2[:, 1] - top2[:, 0]
                    flips = [int(k) for k in np.nonzero(got_arg != ref_arg)[0]]
                    before = first if first is not None else n
                    ious = [
                        _iou(x.mask, y.mask)
                        for x, y in zip(ref.artifacts, got.artifacts, strict=False)
                        if x.token_index < before and y.token_index < before
                    ]
                    pf = (
                        abs(got.fake_probability - ref.fake_probability)
                        if ref.fake_probability is not None and got.fake_probability is not None
                        else None
                    )
                    rows.append({
                        "size": args.size, "steer": steer, "seed": seed, "precision": p, "picture": name,
                        "ran": True, "first_divergence": first, "identical_share": same, "tokens": n,
                        "margin_at_first_divergence": float(margins[first]) if first is not None else None,
                        "forced_flips": [(k, round(float(margins[k]), 4)) for k in flips],
                        "median_margin": float(np.median(margins)),
                        "seg_ious": [round(v, 4) for v in ious],
                        "verdict_agrees": got.verdict == ref.verdict,
                        "p_fake_diff": pf,
                    })  # fmt: skip
                    print(json.dumps(rows[-1]), flush=True)
    return {"accuracy": rows}


# ---------------------------------------------------------------------------------------------------- speed
def read_bandwidth(threads: int, nbytes: int = 1024**3, repeat: int = 5) -> float:
    """bytes/s read by ``threads`` threads summing disjoint parts of one array (numpy releases the GIL)."""
    a = np.ones(nbytes // 4, dtype=np.float32)
    parts = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeat + 1):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t)
    return nbytes / best


def random_llm(size: str, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from legion_rt.export.config import CONFIGS

    c = CONFIGS[size]
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
                      num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                      intermediate_size=c.intermediate_size, max_position_embeddings=c.max_position_embeddings,
                      rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    with torch.no_grad():
        return LlamaForCausalLM(cfg).float().eval()


class Decoder:
    """One llm.onnx session with a filled 32-position prefix; ``time(steps)`` = median ms of ``steps`` decode
    steps (the cache is rewound to the prefix each time, so every call decodes at the same context)."""

    def __init__(self, path: Path, llm, info, threads: int, max_steps: int):
        import onnxruntime as ort

        from legion_rt.backends.ort_llm import OrtLLM
        from legion_rt.export.onnx_llm import llm_model_info

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.runner = OrtLLM(sess, llm_model_info(llm), info)
        self.H = int(llm.config.hidden_size)
        self.rng = np.random.default_rng(0)
        self.prefix = self.runner.new_cache(32)
        self.runner.forward(self.prefix, self.rng.standard_normal((1, 32, self.H)).astype(np.float32) * 0.02)
        self.max_steps = max_steps

    def time(self, steps: int) -> float:
        cache = self.runner.clone_cache(self.prefix, 32 + steps + 2)
        times = []
        for _ in range(steps + 1):
            x = self.rng.standard_normal((1, 1, self.H)).astype(np.float32) * 0.02
            t = time.perf_counter()
            self.runner.forward(cache, x)
            times.append(time.perf_counter() - t)
        return 1000 * statistics.median(times[1:])


def speed(args) -> dict:
    """Interleaved: every round times ``--steps`` steps of each precision in turn; a precision's ms/token is its
    best round (the machine is shared: the minimum is the least disturbed measurement, and interleaving gives
    every precision the same chances)."""
    from legion_rt.export.onnx_llm import build_llm_graph
    from legion_rt.export.quantize import QUANT_DEFAULTS, quantize_file

    bw = read_bandwidth(args.threads)
    rows = []
    for size in args.sizes:
        llm = random_llm(size)
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            tmp = Path(tmp)
            info32 = build_llm_graph(llm, tmp / "fp32.onnx", precision="fp32")
            decoders, sizes = {}, {}
            for p in PRECISIONS + tuple(f"{q}-acc4" for q in args.acc4):
                path = tmp / f"{p}.onnx"
                info = info32
                if p == "fp32":
                    path = tmp / "fp32.onnx"
                elif p == "fp16":
                    info = build_llm_graph(llm, path, precision="fp16")
                else:
                    base = p.split("-")[0]
                    d = QUANT_DEFAULTS[base]
                    q = quantize_file(tmp / "fp32.onnx", path, bits=8 if base == "int8" else 4,
                                      block_size=d["block_size"], symmetric=d["symmetric"],
                                      lm_head_bits=d["lm_head_bits"],
                                      accuracy_level=4 if p.endswith("acc4") else d["accuracy_level"])  # fmt: skip
                    info = dataclasses.replace(info32, precision=base, quant=q)
                sizes[p] = path.stat().st_size + sum(f.stat().st_size for f in tmp.glob(f"{path.name}.data"))
                try:
                    decoders[p] = Decoder(path, llm, info, args.threads, args.steps)
                except Exception as err:  # noqa: BLE001 - the CPU provider lacks some fp16 kernels
                    print(f"{size} {p}: not run on the CPU provider ({str(err).splitlines()[0][:120]})")
            best = {p: float("inf") for p in decoders}
            for _ in range(args.rounds):
                for p, dec in decoders.items():
                    try:
                        best[p] = min(best[p], dec.time(args.steps))
                    except Exception as err:  # noqa: BLE001
                        print(f"{size} {p}: decode failed ({str(err).splitlines()[0][:120]})")
                        best[p] = float("nan")
            for p, nbytes in sizes.items():
                ms = best.get(p)
                ms = ms if ms is not None and np.isfinite(ms) else None
                row = {"size": size, "precision": p, "llm_onnx_bytes": nbytes, "ms_per_token": ms,
                       "gb_per_s": nbytes / ms / 1e6 if ms else None, "roof_gb_per_s": bw / 1e9}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
            del decoders
        del llm
    for r in rows:
        base = next(x for x in rows if x["size"] == r["size"] and x["precision"] == "fp32")
        r["bytes_vs_fp32"] = r["llm_onnx_bytes"] / base["llm_onnx_bytes"]
        r["speedup_vs_fp32"] = base["ms_per_token"] / r["ms_per_token"] if r["ms_per_token"] else None
    return {"speed": rows, "read_bandwidth_gb_per_s": bw / 1e9, "threads": args.threads}


def markdown(res: dict) -> str:
    out = []
    if "speed" in res:
        out.append(
            f"read bandwidth roof: {res['read_bandwidth_gb_per_s']:.1f} GB/s ({res['threads']} threads)\n"
        )
        out.append(
            "| size | precision | llm.onnx MB | x fp32 bytes | decode ms/token | x fp32 speed | GB/s achieved |"
        )
        out.append("|---|---|---|---|---|---|---|")
        for r in res["speed"]:
            ms = f"{r['ms_per_token']:.2f}" if r["ms_per_token"] else "not run (CPU)"
            sp = f"{r['speedup_vs_fp32']:.2f}" if r["speedup_vs_fp32"] else "-"
            gb = f"{r['gb_per_s']:.1f}" if r["gb_per_s"] else "-"
            out.append(f"| {r['size']} | {r['precision']} | {r['llm_onnx_bytes'] / 1e6:.1f} | "
                       f"{r['bytes_vs_fp32']:.3f} | {ms} | {sp} | {gb} |")  # fmt: skip
    if "accuracy" in res:
        out.append("| model | precision | picture | first divergent step | identical / tokens | fp32 margin there "
                   "| forced flips (step: fp32 margin) | median margin | [SEG] IoUs before divergence | verdict | "
                   "dp(fake) |")  # fmt: skip
        out.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in res["accuracy"]:
            model = f"{r['size']} {r['steer']} s{r['seed']}"
            if not r["ran"]:
                out.append(f"| {model} | {r['precision']} | {r['picture']} | not run on the CPU provider |"
                           + " |" * 7)  # fmt: skip
                continue
            fd = "-" if r["first_divergence"] is None else r["first_divergence"]
            mg = "-" if r["margin_at_first_divergence"] is None else f"{r['margin_at_first_divergence']:.3g}"
            flips = ", ".join(f"{k}: {m:.3g}" for k, m in r["forced_flips"][:6]) or "none"
            if len(r["forced_flips"]) > 6:
                flips += f" (+{len(r['forced_flips']) - 6})"
            ious = ", ".join(f"{v:.3f}" for v in r["seg_ious"]) or "-"
            pf = "-" if r["p_fake_diff"] is None else f"{r['p_fake_diff']:.1e}"
            out.append(f"| {model} | {r['precision']} | {r['picture']} | {fd} | "
                       f"{round(r['identical_share'] * r['tokens'])}/{r['tokens']} | {mg} | {flips} | "
                       f"{r['median_margin']:.3g} | {ious} | {'same' if r['verdict_agrees'] else 'DIFFERS'} | {pf} |")  # fmt: skip
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("accuracy")
    a.add_argument("--size", default="tiny", choices=["tiny", "small"])
    a.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    a.add_argument("--steers", nargs="+", default=["loop", "free"])
    a.add_argument("--tokens", type=int, default=128)
    a.add_argument("--threads", type=int, default=2)
    s = sub.add_parser("speed")
    s.add_argument("--sizes", nargs="+", default=["small", "medium"])
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--steps", type=int, default=16)
    s.add_argument("--rounds", type=int, default=4)
    s.add_argument(
        "--acc4",
        nargs="*",
        default=["int8", "int4"],
        help="also these precisions with MatMulNBits accuracy_level 4 (int8 compute)",
    )
    s.add_argument("--tmp", default=None, help="directory for the temporary graphs (default: the system's)")
    for p in (a, s):
        p.add_argument("--json", default=None)
    args = ap.parse_args()
    res = accuracy(args) if args.cmd == "accuracy" else speed(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    print(markdown(res))


if __name__ == "__main__":
    main()
