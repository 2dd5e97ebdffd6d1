"""The released sizes end to end on this machine: make the 7B-shaped random checkpoint, export it (fp16 and int4),
run the int4 artifacts with Engine on ONNX Runtime CPU; per stage: wall time, peak RSS and disk used. Re-runnable:
what exists under --work (checkpoint, artifact directories) is reused; --fresh exports the listed
precisions again (--fresh-model: the checkpoint too).

    python benchmarks/full_size.py --work DIR [--precisions fp16,int4] [--tokens 16,64] [--threads 2]
                                   [--reference] [--fresh [--fresh-model]] [--json out.json]

Stages (each in its own process, so its peak RSS is its own):
  make      legion-rt make-tiny --size full   (export/tiny/full.py: streamed, ~16 GB)
  export    legion-rt export --precision P    (a streamed LLM: export/truncated.py says what is verified)
  run       Engine(int4 artifacts).request(picture, max_new_tokens=N) for each N: time to first token, ms/token
            against the bandwidth roof of the int4 weights, SAM ViT-H encoder time, first mask, peak RSS
  reference (--reference) PyTorch bf16 eager of the whole checkpoint (export/reference.py, KV cache) on the same
            picture: its greedy tokens against the int4 Engine's, the only check of all 32 layers of llm.onnx

Peak RSS: the stage process's VmHWM plus its children's (``resource.RUSAGE_CHILDREN`` of a fresh wrapper); per
export step, the largest RSS sampled every 0.5 s between two progress lines. Disk: bytes under the stage's output
directory at the end of each step (the export writes into a temporary directory beside --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `python benchmarks/full_size.py` puts this folder first on sys.path, where benchmarks/kernels.py would shadow the
# `kernels` package that transformers probes for: keep the folder off the path (e2e.py is loaded by file).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]


def _e2e():
    import importlib.util

    spec = importlib.util.spec_from_file_location("legion_bench_e2e", ROOT / "benchmarks" / "e2e.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GB = 10**9
# Disk needed by the stages that are not cached yet (bytes, measured on the first run, rounded up; README table).
DISK_NEED = {"make": 17 * GB, "fp16": 16 * GB, "int4": 6 * GB, "int8": 9 * GB, "fp32": 31 * GB}


def tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def rss_of_tree(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants (from /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for t in Path(f"/proc/{p}/task").iterdir():
                kids = (t / "children").read_text().split()
                todo += [int(k) for k in kids]
        except (OSError, ValueError):
            pass
    return total


def monitored(cmd: list[str], *, watch: Path, label: str, env=None) -> dict:
    """Run ``cmd``; echo its stderr; split it into steps at the export's progress lines ("[k/N] what: ... s");
    record per step: seconds, peak RSS sampled every 0.5 s, bytes under ``watch`` (and its temporary sibling)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    state = {"peak": 0, "step_peak": 0}

    def sample():
        while proc.poll() is None:
            r = rss_of_tree(proc.pid)
            state["peak"] = max(state["peak"], r)
            state["step_peak"] = max(state["step_peak"], r)
            time.sleep(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    steps, last, lines = [], t0, []
    for line in proc.stdout:
        sys.stderr.write(f"  [{label}] {line}")
        lines.append(line.rstrip())
        text = line.strip()
        if text.startswith("[") and "/" in text.split("]")[0] and text.rstrip().endswith(" s"):
            now = time.perf_counter()
            disk = sum(tree_bytes(p) for p in watch.parent.glob(f"*{watch.name}*") if p.is_dir())
            steps.append({"step": text.split("]", 1)[1].rsplit(":", 1)[0].strip(), "seconds": round(now - last, 1),
                          "peak_rss_gb": round(state["step_peak"] / GB, 2), "disk_gb": round(disk / GB, 2)})  # fmt: skip
            state["step_peak"] = rss_of_tree(proc.pid)
            last = now
    rc = proc.wait()
    th.join()
    if rc != 0:
        tail = "\n".join(lines[-5:])
        raise SystemExit(f"{label}: '{' '.join(cmd)}' failed with exit code {rc}:\n{tail}")
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_gb": round(state["peak"] / GB, 2),
            "disk_gb": round(tree_bytes(watch) / GB, 2), "steps": steps}  # fmt: skip


def check_disk(work: Path, need: int) -> None:
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(
            f"{work}: the stages left to run need about {need / GB:.0f} GB of disk, {free / GB:.0f} GB free"
        )


def cli() -> list[str]:
    return [str(Path(sys.executable).with_name("legion-rt"))]


# ------------------------------------------------------------------------------------------------------ run stage
def run_child(args) -> None:
    """The run stage, in its own process: prints one JSON line."""
    import resource

    import numpy as np

    from legion_rt.engine import Engine

    e2e = _e2e()

    art = Path(args.artifacts)
    t0 = time.perf_counter()
    engine = Engine(art, threads=args.threads)
    load_s = time.perf_counter() - t0
    picture = ROOT / "legion_rt" / "assets" / "demo.jpg"
    weights = sum(p.stat().st_size for p in art.glob("llm.onnx*"))
    bw = e2e.copy_bandwidth()
    m = engine.manifest.model
    prompt = (
        len(engine.manifest.prompt.prefix_ids) + m.num_image_tokens + len(engine.manifest.prompt.suffix_ids)
    )
    kv_per_position = (
        2
        * m.num_layers
        * m.num_kv_heads
        * m.head_dim
        * (4 if engine.manifest.graphs.llm.kv_dtype == "float32" else 2)
    )

    def step_bytes(n: int) -> int:
        """What a decode step reads: every llm.onnx weight byte (packed int4, scales, the int8 lm_head) and the KV
        cache at the run's mean context (the copy bandwidth, read + write, is the roof as in benchmarks/e2e.py)."""
        return weights + kv_per_position * (prompt + n // 2)

    runs = []
    for n in args.tokens:
        t = time.perf_counter()
        first_token = first_mask = None
        steps = []
        req = engine.request(str(picture), max_new_tokens=n, ignore_eos=True)
        for ev in req:
            now = time.perf_counter() - t
            kind = type(ev).__name__
            if kind == "TokenEvent":
                steps.append(now)
                first_token = first_token or now
            elif kind == "MaskEvent" and first_mask is None:
                first_mask = now
            elif kind == "DoneEvent":
                result = ev.result
        total = time.perf_counter() - t
        if n == args.tokens[-1]:
            np.save(art.parent / "engine_masks.npy", np.stack([a.mask for a in result.artifacts]) if result.artifacts
                    else np.zeros((0, 1, 1), bool))  # fmt: skip
        decode = np.diff(steps)
        ms = float(np.median(decode) * 1e3) if len(decode) else float("nan")
        runs.append({
            "max_new_tokens": n, "tokens": len(result.token_ids), "masks": len(result.artifacts),
            "ttft_s": round(first_token, 2), "ms_per_token": round(ms, 1), "first_mask_s": round(first_mask or -1, 2),
            "total_s": round(total, 1), "timings": {k: round(v, 3) for k, v in (result.timings or {}).items()},
            "roof_ms": round(step_bytes(n) / bw * 1e3, 1), "achieved_gb_s": round(step_bytes(n) / (ms / 1e3) / GB, 1),
            "text": result.text[:160], "token_ids": list(result.token_ids),
        })  # fmt: skip
    # The LLM alone (nothing else on the cores; in a request the SAM encoder and the mask jobs share them): decode
    # steps after a short context, where the step reads the int4 weights and little KV cache.
    llm, ctx = engine._backend.llm, 32
    cache = llm.new_cache(ctx + 13)
    rng = np.random.default_rng(0)
    llm.forward(cache, rng.standard_normal((1, ctx, m.hidden_size), dtype=np.float32) * 0.02)
    alone = []
    for _ in range(12):
        t = time.perf_counter()
        llm.forward(cache, rng.standard_normal((1, 1, m.hidden_size), dtype=np.float32) * 0.02)
        alone.append(time.perf_counter() - t)
    alone_ms = float(np.median(alone) * 1e3)
    alone_bytes = weights + kv_per_position * (ctx + 6)
    llm_alone = {"context": ctx, "ms_per_token": round(alone_ms, 1), "roof_ms": round(alone_bytes / bw * 1e3, 1),
                 "achieved_gb_s": round(alone_bytes / (alone_ms / 1e3) / GB, 1)}  # fmt: skip
    print(json.dumps({"load_s": round(load_s, 1), "weights_gb": round(weights / GB, 2), "llm_alone": llm_alone,
                      "copy_gb_s": round(bw / GB, 1), "runs": runs,
                      "vm_hwm_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 2)}))  # fmt: skip


def bf16_reference(checkpoint: Path, clip: Path, detector: Path):
    """export/reference.py's pipeline over the whole checkpoint: the LLM's decoder layers and final norm in bf16 as
    stored, used straight from the memory-mapped shards (file pages the kernel can drop: the 13 GB of a 7B decoder
    never become anonymous memory), embeddings, lm_head and everything else in fp32; hooks cast the decoder's
    input to bf16 and its final-norm output back to fp32."""
    import torch

    from legion_rt.export.checkpoint import load_legion
    from legion_rt.export.reference import ReferencePipeline

    model = load_legion(checkpoint, clip, detector, stream_llm=True)
    w = model.llm_weights
    state = {name: (w[name] if name.startswith("lm_head.") else w.mapped(name)) for name in w.keys()}
    state["model.embed_tokens.weight"] = model.llm.model.embed_tokens.weight
    model.llm.load_state_dict(state, assign=True, strict=True)
    model.llm.requires_grad_(False)

    def to_bf16(_mod, args, kwargs):
        if kwargs.get("inputs_embeds") is not None:
            kwargs["inputs_embeds"] = kwargs["inputs_embeds"].to(torch.bfloat16)
        return args, kwargs

    def to_fp32(_mod, _args, _kwargs, out):
        out.last_hidden_state = out.last_hidden_state.float()
        return out

    model.llm.model.register_forward_pre_hook(to_bf16, with_kwargs=True)
    model.llm.model.register_forward_hook(to_fp32, with_kwargs=True)
    return ReferencePipeline.from_checkpoint(checkpoint, clip, detector, model=model)


def reference_child(args) -> None:
    """PyTorch eager (bf16 decoder), whole checkpoint, KV cache: greedy token ids and masks (one JSON line)."""
    import resource

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    model = Path(args.model)
    t0 = time.perf_counter()
    ref = bf16_reference(model / "checkpoint", model / "clip", model / "detector.bin")
    load_s = time.perf_counter() - t0
    picture = ROOT / "legion_rt" / "assets" / "demo.jpg"
    t = time.perf_counter()
    with torch.no_grad():
        out = ref.run(str(picture), max_new_tokens=args.tokens[-1], use_kv_cache=True, ignore_eos=True)
    np.save(model.parent / "reference_masks.npy", np.asarray(out.masks, bool))
    print(json.dumps({"load_s": round(load_s, 1), "seconds": round(time.perf_counter() - t, 1),
                      "token_ids": [int(i) for i in out.token_ids], "timings": out.timings,
                      "vm_hwm_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 2)}))  # fmt: skip


def child(mode: str, args, **extra) -> dict:
    cmd = [sys.executable, __file__, f"--{mode}-child", "--threads", str(args.threads),
           "--tokens", ",".join(map(str, args.tokens))]  # fmt: skip
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode}: failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def plan_check(art: Path, precision: str) -> dict:
    """legion_rt.memory_plan's registry plan of the 7B ("legion-7b", from sizes alone: the Jetson table in the
    README) against the plan read off the exported files: bytes per graph and the relative difference."""
    from legion_rt.memory_plan import plan_memory

    files = {name: sum(f.stat().st_size for f in art.glob(f"{name}.onnx*")) for name in
             ("vision", "sam_encoder", "mask_head", "llm")}  # fmt: skip
    files["embed_tokens"] = (art / "embed_tokens.npy").stat().st_size
    from_sizes = plan_memory("legion-7b", precision).graphs
    from_files = plan_memory(art).graphs
    rows = {}
    for name, on_disk in files.items():
        key = next((k for k in from_sizes if k.startswith(name)), None)
        if key is None:
            continue
        rows[name] = {"files": on_disk, "plan_from_sizes": from_sizes[key], "plan_from_artifacts": from_files.get(key),
                      "sizes_vs_files": round(from_sizes[key] / on_disk - 1, 4)}  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--precisions", default="fp16,int4")
    ap.add_argument("--tokens", default="16,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reference", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="export the listed precisions again")
    ap.add_argument("--fresh-model", action="store_true", help="with --fresh: write the checkpoint again too")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--run-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reference-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--artifacts", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    if args.run_child:
        return run_child(args)
    if args.reference_child:
        return reference_child(args)
    if args.work is None:
        ap.error("--work DIR is required (about 40 GB of disk)")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    precisions = [p for p in args.precisions.split(",") if p]
    if args.fresh:  # the listed precisions' artifacts (the checkpoint too with --fresh-model)
        for p in [*([model] if args.fresh_model else []), *(work / f"artifacts-{p}" for p in precisions)]:
            shutil.rmtree(p, ignore_errors=True)
    todo = ([] if (model / "tiny_info.json").is_file() else ["make"]) + [
        p for p in precisions if not (work / f"artifacts-{p}" / "manifest.json").is_file()
    ]
    check_disk(work, sum(DISK_NEED.get(t, 16 * GB) for t in todo))
    report = {"machine": {"cpus": os.cpu_count(), "threads": args.threads}, "stages": {}}
    if "make" in todo:
        report["stages"]["make"] = monitored([*cli(), "make-tiny", "--size", "full", "--out", str(model)],
                                             watch=model, label="make")  # fmt: skip
    for p in precisions:
        out = work / f"artifacts-{p}"
        if p in todo:
            cmd = [*cli(), "export", "--checkpoint", str(model / "checkpoint"), "--clip", str(model / "clip"),
                   "--detector", str(model / "detector.bin"), "--out", str(out), "--precision", p]  # fmt: skip
            report["stages"][f"export {p}"] = monitored(cmd, watch=out, label=f"export {p}")
        manifest = json.loads((out / "manifest.json").read_text())
        report.setdefault("verification", {})[p] = manifest["verification"]
        report.setdefault("memory_plan", {})[p] = plan_check(out, p)
    run_on = "int4" if "int4" in precisions else precisions[-1]
    report["stages"]["run"] = child("run", args, artifacts=work / f"artifacts-{run_on}")
    if args.reference:
        report["stages"]["reference"] = ref = child("reference", args, model=model)
        ours = report["stages"]["run"]["runs"][-1]["token_ids"]
        same = next((k for k, (a, b) in enumerate(zip(ours, ref["token_ids"], strict=False)) if a != b), None)
        import numpy as np

        mine, theirs = np.load(work / "engine_masks.npy"), np.load(work / "reference_masks.npy")
        ious = [float((a & b).sum() / max((a | b).sum(), 1)) for a, b in zip(mine, theirs, strict=False)]
        report["reference_agreement"] = {
            "identical_prefix": len(ours) if same is None else same,
            "compared": min(len(ours), len(ref["token_ids"])),
            "masks": [len(mine), len(theirs)],
            "mask_iou_min": round(min(ious), 4) if ious else None,
            "mask_iou_mean": round(float(np.mean(ious)), 4) if ious else None,
        }
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def print_table(report: dict) -> None:
    print("\n| stage | wall s | peak RSS GB | disk GB |\n|---|---|---|---|")
    for name, st in report["stages"].items():
        if "steps" in st:
            print(f"| **{name}** | {st['seconds']} | {st['peak_rss_gb']} | {st['disk_gb']} |")
            for s in st["steps"]:
                print(f"| &nbsp; {s['step']} | {s['seconds']} | {s['peak_rss_gb']} | {s['disk_gb']} |")
    for p, rows in report.get("memory_plan", {}).items():
        print(f"\nmemory plan ({p}): registry 'legion-7b' from sizes vs the exported files")
        print("| graph | files MB | plan from sizes MB | difference |\n|---|---|---|---|")
        for name, r in rows.items():
            print(
                f"| {name} | {r['files'] / 1e6:.1f} | {r['plan_from_sizes'] / 1e6:.1f} | {100 * r['sizes_vs_files']:+.1f} % |"
            )
    run = report["stages"].get("run")
    if run:
        print(f"\nrun (Engine on ONNX Runtime CPU): load {run['load_s']} s, llm.onnx {run['weights_gb']} GB, "
              f"copy bandwidth {run['copy_gb_s']} GB/s, peak RSS {run['vm_hwm_gb']} GB")  # fmt: skip
        print("| max_new_tokens | tokens | masks | ttft s | ms/token | roof ms | GB/s | first mask s | "
              "sam_encoder s | total s |\n|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
        for r in run["runs"]:
            print(f"| {r['max_new_tokens']} | {r['tokens']} | {r['masks']} | {r['ttft_s']} | {r['ms_per_token']} | "
                  f"{r['roof_ms']} | {r['achieved_gb_s']} | {r['first_mask_s']} | "
                  f"{r['timings'].get('sam_encoder', float('nan'))} | {r['total_s']} |")  # fmt: skip
        a = run["llm_alone"]
        print(f"LLM alone (decode after {a['context']} positions, nothing else running): {a['ms_per_token']} ms/token, "
              f"roof {a['roof_ms']} ms, {a['achieved_gb_s']} GB/s")  # fmt: skip
        print(f"text: {run['runs'][-1]['text']!r}")
    if "reference_agreement" in report:
        a = report["reference_agreement"]
        print(f"greedy tokens vs PyTorch (bf16 decoder, whole model): first {a['identical_prefix']} of "
              f"{a['compared']} identical; masks {a['masks'][0]} vs {a['masks'][1]}, IoU min {a['mask_iou_min']} "
              f"mean {a['mask_iou_mean']}")  # fmt: skip


if __name__ == "__main__":
    main()
