"""Verification of exported graphs: each graph is run in ONNX Runtime (CPU, configured like the runtime) on seeded
inputs and judged against PyTorch. ``verify_graphs`` runs the four graphs of an artifact directory; ``vision_case``,
``sam_case``, ``mask_head_case`` and ``llm_case`` build one graph's run, ``verify_cases`` judges them.

How a graph is judged (fp32 exports). ONNX Runtime and PyTorch both compute in float32, so neither is exact:
the question is whether ORT is as accurate as PyTorch's own float32, not whether the two agree to a fixed
number. The reference is the same PyTorch model run in float64 (its parameters cast to float64 in place, then
cast back: fp32 -> fp64 -> fp32 is exact), rounded to float32 once at the end. Rule "fp64_ratio":

    max|ORT - ref64| <= K * max|torch_fp32 - ref64| + ULP_FLOOR * max|ref64|        (per output tensor)

(the flash-attention test rule). The floor, a few float32 ulps of the largest value, keeps an output that
PyTorch happens to round exactly (e.g. 2 detector logits) from demanding bit-exactness of ORT.
When the float64 copy does not fit in memory (a 7B LLM needs 56 GB), rule "rms_rtol" compares ORT with
PyTorch fp32 directly: max|ORT - torch_fp32| <= atol + rtol * rms(torch_fp32), rms (not max) so that one
large logit does not loosen the limit for all the others. fp16 graphs are judged against PyTorch fp32 with
rule "fp16_max" (atol + rtol * max|torch|). The LLM also needs the same greedy tokens as PyTorch at every step.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import memory, truncated
from .onnx_llm import ExportError, llm_model_info
from .progress import Progress

__all__ = ["Tolerance", "TOLERANCES", "verify_graphs", "verify_cases"]

K_FP64 = 6.0
ULP_FLOOR = 32 * 2.0**-23  # ~3.8e-6 relative to max|ref64|
# K, measured 2026-11-28 on 20 input seeds (seed = 0..19 of verify_graphs) for each of the tiny and small
# make_tiny exports, max over outputs of max|ORT - ref64| / max|torch_fp32 - ref64|, worst (median) over seeds:
#   tiny:  vision 3.71 (1.42), sam_encoder 0.96 (0.89), mask_head 1.41 (1.22), llm 3.00 (1.36)
#   small: vision 2.00* (1.30), sam_encoder 1.00 (0.91), mask_head 1.48 (1.27), llm 3.83 (2.00)
#   (* small's 2 detector logits: PyTorch fp32 is exactly the rounded fp64 there, ORT 1 ulp off: the floor case)
# No correct export failed (40 runs). K = 6, 1.5x the worst seen. A graph with its largest weight tensor scaled
# by (1 + 1e-3) gives ratios of 66-2500 (vision, mask_head, llm; tiny and small); a scaling of the SAM encoder's
# last conv is invisible (a LayerNorm follows), so the test perturbs each element by +-1e-3 instead.


@dataclass(frozen=True)
class Tolerance:
    """Fallback rule "rms_rtol": max|ort - torch| <= atol + rtol * rms(torch)."""

    atol: float
    rtol: float

    def limit(self, ref_rms: float) -> float:
        return self.atol + self.rtol * ref_rms

    def scaled(self, k: float) -> Tolerance:
        return Tolerance(atol=self.atol * k, rtol=self.rtol * k)


# max|ORT - torch_fp32| / rms(torch_fp32), worst over the same 20 seeds x {tiny, small}: vision 5.1e-6,
# sam_encoder 4.4e-6, mask_head 5.3e-6, llm 1.9e-5 (tiny, 2 layers) / 7.6e-5 (small, 6 layers). rtol ~10x that;
# the LLM 13x, as this is the rule a 7B (32 layers) LLM gets. Corrupted graphs: 2e-4 (vision) to 3e-2 (llm).
TOLERANCES = {
    "vision": Tolerance(atol=1e-6, rtol=5e-5),
    "sam_encoder": Tolerance(atol=1e-6, rtol=5e-5),
    "mask_head": Tolerance(atol=1e-6, rtol=5e-5),
    "llm": Tolerance(atol=1e-6, rtol=1e-3),
}
# fp16 graphs against fp32 PyTorch, on the CPU provider when it can run them (rule "fp16_max": atol + rtol *
# max|torch|). Measured (tiny): vision 6.9e-4, sam_encoder 2.3e-3, mask_head 3.0e-4, llm 2.5e-3
# (|ref| ~0.3-4.7). Limits ~10x.
FP16_ATOL, FP16_RTOL = 1e-2, 5e-3


def _session(path: Path, threads: int = 0):
    """A CPU session configured like the runtime's (legion_rt/backends/onnxruntime.py): the graph verified is the
    graph that runs."""
    import onnxruntime as ort

    from legion_rt.backends.onnxruntime import disabled_optimizers

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    return ort.InferenceSession(
        str(path),
        opts,
        providers=providers,
        disabled_optimizers=disabled_optimizers(Path(path).stem, providers),
    )


def _np(t):
    return t.detach().float().cpu().numpy()


@dataclass
class _Check:
    """The verdict for one graph: its worst output (largest err / limit)."""

    name: str
    rule: str  # "fp64_ratio" | "rms_rtol" | "fp16_max"
    max_abs: float  # max |ORT - reference| of the worst output (reference: ref64, or torch fp32)
    limit: float
    ref_max: float
    ref_rms: float
    output: str = ""
    torch_err: float | None = None  # max |torch fp32 - ref64| (fp64_ratio)
    argmax: str | None = None  # LLM: greedy tokens ORT vs PyTorch
    argmax_ok: bool = True
    note: str = ""

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs)) and self.max_abs <= self.limit and self.argmax_ok

    @property
    def ratio(self) -> float | None:
        """max|ORT - ref64| / max|torch - ref64| (fp64 rule only)."""
        if self.torch_err is None:
            return None
        return self.max_abs / self.torch_err if self.torch_err > 0 else float("inf")

    def to_json(self) -> dict:
        out = {"rule": self.rule, "max_abs_err": self.max_abs, "limit": self.limit, "output": self.output,
               "ref_max": self.ref_max, "ref_rms": self.ref_rms}  # fmt: skip
        if self.rule == "fp64_ratio":
            out.update(torch_fp32_err=self.torch_err, k=K_FP64, ratio=self.ratio)
        if self.argmax is not None:
            out["greedy_argmax"] = self.argmax
        if self.note:
            out["note"] = self.note
        return out

    def line(self) -> str:
        s = f"{self.name:<12} {self.rule:<10} max abs err {self.max_abs:.3g} (limit {self.limit:.3g}"
        if self.torch_err is not None:
            s += f"; torch fp32 err {self.torch_err:.3g}, ratio {self.ratio:.2f}"
        s += f"; |ref| max {self.ref_max:.3g}, rms {self.ref_rms:.3g}) [{self.output}]"
        if self.argmax is not None:
            s += f"; greedy: {self.argmax}"
        return s + (f"  {self.note}" if self.note else "")


@dataclass
class _Case:
    """One graph's verification run: inputs fixed once, ORT outputs, PyTorch outputs in fp32 and (when the
    model fits in memory as float64) in float64. ``torch_fn()`` recomputes the PyTorch outputs in whatever dtype
    the model has at the moment: {output name: [array per call]}."""

    name: str
    ort: dict
    torch_fn: object
    t32: dict = field(default_factory=dict)
    ref64: dict | None = None
    note: str = ""
    llm_logits: str | None = None  # output holding per-step logits (greedy argmax check)


def _cat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays])


def _judge(case: _Case, rule: str, scale: float) -> _Check:
    worst = None
    for key, got_list in case.ort.items():
        for g, w in zip(got_list, case.t32[key], strict=True):
            if g.shape != w.shape:
                raise ExportError(
                    f"{case.name}: ONNX Runtime output {key} shape {list(g.shape)} != PyTorch {list(w.shape)}"
                )
        got, t32 = _cat(got_list), _cat(case.t32[key])
        if rule == "fp64_ratio":
            ref = _cat(case.ref64[key])
            err = float(np.abs(got - ref).max())
            t_err = float(np.abs(t32 - ref).max())
            ref_max, ref_rms = float(np.abs(ref).max()), float(np.sqrt(np.mean(ref**2)))
            limit = scale * (K_FP64 * t_err + ULP_FLOOR * ref_max)
        else:
            err = float(np.abs(got - t32).max())
            t_err = None
            ref_max, ref_rms = float(np.abs(t32).max()), float(np.sqrt(np.mean(t32**2)))
            if rule == "rms_rtol":
                limit = TOLERANCES[case.name].scaled(scale).limit(ref_rms)
            else:  # fp16_max
                limit = scale * (FP16_ATOL + FP16_RTOL * ref_max)
        c = _Check(case.name, rule, err, limit, ref_max, ref_rms, output=key, torch_err=t_err, note=case.note)
        if not np.isfinite(err):
            c.max_abs = float("inf")
        if worst is None or c.max_abs / max(c.limit, 1e-30) > worst.max_abs / max(worst.limit, 1e-30):
            worst = c
    if case.llm_logits is not None:
        _greedy(case, worst, rule, scale)
    return worst


def _greedy(case: _Case, check: _Check, rule: str, scale: float) -> None:
    """Greedy tokens of ORT vs PyTorch fp32 at every step must be identical. A difference is accepted only at a
    near-tie: when the reference's logits of the two tokens differ by less than the logits' limit (then neither
    float32 result is more right than the other)."""
    key = case.llm_logits
    ref_list = case.ref64[key] if rule == "fp64_ratio" else case.t32[key]
    steps, ties, bad = 0, 0, 0
    for got, t32, ref in zip(case.ort[key], case.t32[key], ref_list, strict=True):
        a, b = int(np.argmax(got)), int(np.argmax(t32))
        steps += 1
        if a == b:
            continue
        gap = abs(float(ref.reshape(-1)[a]) - float(ref.reshape(-1)[b]))
        lim = check.limit if check.output == key else _judge_one_limit(case, key, rule, scale)
        if gap <= lim:
            ties += 1
        else:
            bad += 1
    check.argmax = f"{steps - ties - bad}/{steps} identical" + (f", {ties} near-tie(s)" if ties else "")
    check.argmax_ok = bad == 0


def _judge_one_limit(case: _Case, key: str, rule: str, scale: float) -> float:
    sub = _Case(case.name, {key: case.ort[key]}, case.torch_fn, {key: case.t32[key]},
                None if case.ref64 is None else {key: case.ref64[key]})  # fmt: skip
    return _judge(sub, rule, scale).limit


def vision_case(path: Path, model, seed: int) -> _Case:
    import torch

    g = torch.Generator().manual_seed(seed)
    px = torch.randn(1, 3, 336, 336, generator=g)  # normalized pixels: ~N(0,1)
    has_det = getattr(model, "prediction_head", None) is not None
    names = ["image_embeds", "cls_logits"] if has_det else ["image_embeds"]
    got = _session(path).run(None, {"pixel_values": px.numpy()})

    def torch_fn():
        patches, cls = model.clip_features(px)
        outs = [_np(model.project(patches))] + ([_np(model.detect(cls))] if has_det else [])
        return {n: [o] for n, o in zip(names, outs, strict=True)}

    return _Case("vision", {n: [o] for n, o in zip(names, got, strict=True)}, torch_fn)


def sam_case(path: Path, model, seed: int) -> _Case:
    import torch

    px = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(seed + 1))
    got = _session(path).run(None, {"pixel_values": px.numpy()})[0]
    return _Case("sam_encoder", {"image_embeddings": [got]},
                 lambda: {"image_embeddings": [_np(model.sam_encode(px))]})  # fmt: skip


def mask_head_case(path: Path, model, image_embeddings: np.ndarray, seed: int) -> _Case:
    """N = 1 and N = 3 [SEG] states (hidden-state-like scale), on a real SAM embedding of the check image."""
    import torch

    g = torch.Generator().manual_seed(seed + 2)
    H = int(model.cfg.hidden_size)
    segs = [torch.randn(n, H, generator=g) for n in (1, 3)]
    sess = _session(path)
    got = [sess.run(None, {"seg_hidden": s.numpy(), "image_embeddings": image_embeddings})[0] for s in segs]
    emb = torch.from_numpy(image_embeddings)
    return _Case("mask_head", {"low_res_masks": got},
                 lambda: {"low_res_masks": [_np(model.mask_head(s, emb)) for s in segs]}, note="N=1,3")  # fmt: skip


def llm_case(path: Path, info, llm, seed: int, *, prompt: int = 24, steps: int = 8) -> _Case:
    """Prefill of ``prompt`` positions in two chunks (prefix, then the rest, through clone_cache), then ``steps``
    greedy decode steps (tokens chosen by PyTorch fp32, fed to both); every step's logits and hidden state."""
    import torch
    from transformers import DynamicCache

    from legion_rt.backends.ort_llm import OrtLLM

    table = _np(llm.get_input_embeddings().weight)
    rng = np.random.default_rng(seed)
    embeds = table[rng.integers(0, int(llm.config.vocab_size), prompt)][None]  # [1,P,H]

    def torch_fn(inputs=None):
        """Teacher-forced when ``inputs`` is given (the fp64 pass), else greedy; returns outputs (+ inputs)."""
        dtype = next(llm.parameters()).dtype
        cache = DynamicCache(config=llm.config)
        x, fed, outs = embeds, [], {"logits": [], "hidden": []}
        for k in range(steps + 1):
            x = inputs[k] if inputs is not None else x
            fed.append(x)
            out = llm(inputs_embeds=torch.from_numpy(x).to(dtype), cache=cache, use_cache=True,
                      output_hidden_states=True)  # fmt: skip
            cache = out.cache
            outs["logits"].append(_np(out.logits[0, -1]))
            outs["hidden"].append(_np(out.hidden_states[-1][0, -1]))
            x = table[int(np.argmax(outs["logits"][-1]))][None, None]
        return outs, fed

    t32, fed = torch_fn()
    runner = OrtLLM(_session(path), llm_model_info(llm), info)
    split = prompt // 3
    prefix_cache = runner.new_cache(split)
    runner.forward(prefix_cache, embeds[:, :split])
    cache = runner.clone_cache(prefix_cache, prompt + steps)
    got = {"logits": [], "hidden": []}
    for k in range(steps + 1):
        logits, hidden = runner.forward(cache, embeds[:, split:] if k == 0 else fed[k])
        got["logits"].append(logits)
        got["hidden"].append(hidden)
    case = _Case("llm", got, lambda: torch_fn(fed)[0], note=f"prefill {prompt} + {steps} steps",
                 llm_logits="logits")  # fmt: skip
    case.t32 = t32
    return case


@contextmanager
def _float64(modules):
    """Cast ``modules`` to float64 in place for the duration (and back: fp32 -> fp64 -> fp32 is exact)."""
    try:
        for m in modules:
            m.double()
        yield
    finally:
        for m in modules:
            m.float()


def _param_bytes(modules, per: int) -> int:
    return sum(t.numel() * per for m in modules for t in list(m.parameters()) + list(m.buffers())
               if t.is_floating_point())  # fmt: skip


FP64_BASE_ACTIVATIONS = 2 * 1024**3


def _fp64_fits(modules, activations: int = 0) -> bool:
    """float64 parameters (the float32 ones are freed as each is cast) + 2 GiB + ``activations``: the group's own
    float64 activation peak where it is larger (SAM ViT-H's global attention: sam_attention_bytes)."""
    return _param_bytes(modules, 4) + FP64_BASE_ACTIVATIONS + activations <= memory.available_memory()


def sam_attention_bytes(cfg, itemsize: int = 8) -> int:
    """Peak bytes of a SAM image encoder's global-attention block in eager PyTorch beyond its weights: the scores
    [heads, T, T] (T = grid^2 tokens), the decomposed relative-position sum, its copy and the softmax, alive
    together (4 of them). ViT-H at 1024 px in float64: 4 x 16 x 4096^2 x 8 = 8.6 GB. Measured on the 7B-shaped
    export (24 GB machine, 2026-12-07): a flat 2 GiB allowance let the int4 export be killed for memory; 3 score
    tensors let the float64 pass run with the process peaking at 24.25 GB of 24.7; with 4 it falls back to rule
    rms_rtol there (peak 16.3 GB)."""
    h, w = cfg.sam_embedding_hw
    return 4 * int(cfg.sam_num_heads) * (h * w) ** 2 * itemsize


def verify_cases(cases: list[_Case], groups: list[tuple], *, scale: float = 1.0,
                 fp16: bool = False) -> list[_Check]:  # fmt: skip
    """Compute the PyTorch fp32 outputs of every case (and float64 ones for the groups whose modules fit in
    memory as float64: ``groups`` = [(modules, cases[, float64 activation bytes beyond the 2 GiB allowance])],
    each group cast and run on its own, so only one group is float64 at a time), then judge each case. fp16 graphs are judged against
    PyTorch fp32 (rule fp16_max)."""
    import torch

    with torch.no_grad():
        for c in cases:
            if not c.t32:
                c.t32 = c.torch_fn()
        if not fp16:
            for modules, group, *activations in groups:
                if group and _fp64_fits(modules, *activations):
                    with _float64(modules):
                        for c in group:
                            c.ref64 = c.torch_fn()
    rule = lambda c: "fp16_max" if fp16 else ("fp64_ratio" if c.ref64 is not None else "rms_rtol")  # noqa: E731
    return [_judge(c, rule(c), scale) for c in cases]


def verify_graphs(out_dir: Path, model, info, seed: int = 0, *, scale: float = 1.0, fp16: bool = False,
                  bar=None) -> list[_Check]:  # fmt: skip
    """Run every graph of ``out_dir`` in ONNX Runtime (CPU) on seeded inputs and judge it against PyTorch."""
    import torch

    bar = bar or Progress(False, 0)
    cases, skipped = [], []

    def attempt(name, fn):
        try:
            return fn()
        except ExportError:
            raise
        except Exception as err:
            if not fp16:
                raise
            # fp16 graphs are meant for GPU providers; the CPU provider lacks fp16 kernels for some ops.
            bar.log(
                f"  {name:<12} fp16 not verifiable on the CPU provider ({str(err).splitlines()[0][:120]})"
            )
            skipped.append(name)
            return None

    with torch.no_grad():
        for c in (
            attempt("vision", lambda: vision_case(out_dir / "vision.onnx", model, seed)),
            attempt("sam_encoder", lambda: sam_case(out_dir / "sam_encoder.onnx", model, seed)),
        ):
            if c is not None:
                cases.append(c)
        sam_px = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(seed + 1))
        emb = _np(model.sam_encode(sam_px))  # PyTorch's embedding of the check image: the mask head's input
        c = attempt("mask_head", lambda: mask_head_case(out_dir / "mask_head.onnx", model, emb, seed))
        if c is not None:
            cases.append(c)
    if not truncated.is_streamed(model):
        with torch.no_grad():
            c = attempt("llm", lambda: llm_case(out_dir / "llm.onnx", info, model.llm, seed))
        if c is not None:
            cases.append(c)
        return _verify_with_llm(cases, model, model.llm, scale, fp16)
    # A streamed LLM: its first layers, exported by the same builder, stand for it (export/truncated.py).
    from .onnx_llm import build_llm_graph

    llm = truncated.truncated_llm(model)
    with truncated.side_dir(out_dir) as side:
        precision = "fp16" if info.precision == "fp16" else "fp32"
        t_info = build_llm_graph(llm, side / "llm.onnx", precision=precision)
        with torch.no_grad():
            c = attempt("llm", lambda: llm_case(side / "llm.onnx", t_info, llm, seed))
        if c is not None:
            c.note += "; " + truncated.truncated_note(model)
            cases.append(c)
        return _verify_with_llm(cases, model, llm, scale, fp16)


def fp64_groups(model, llm, cases) -> list[tuple]:
    """The float64 groups of verify_graphs: each graph's own modules (CLIP + projector + detector; SAM + the text
    projection for the SAM encoder and mask head; the LLM), so a 7B-shaped model's float64 copies are made one
    graph at a time."""
    by = {c.name: c for c in cases}
    parts = dict(model.named_children())
    vision = [parts[n] for n in ("clip", "mm_projector", "prediction_head") if parts.get(n) is not None]
    sam = [parts[n] for n in ("grounding_encoder", "text_hidden_fcs") if parts.get(n) is not None]
    others = [m for n, m in parts.items() if m is not None and m not in vision + sam and n != "llm"]
    pick = lambda *names: [by[n] for n in names if n in by]  # noqa: E731
    return [
        (vision + others, pick("vision")),
        (sam, pick("sam_encoder", "mask_head"), sam_attention_bytes(model.cfg)),
        ([llm], pick("llm")),
    ]


def _verify_with_llm(cases, model, llm, scale, fp16):
    return verify_cases(cases, fp64_groups(model, llm, cases), scale=scale, fp16=fp16)
