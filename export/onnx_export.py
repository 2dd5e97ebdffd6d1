"""Export a LEGION checkpoint to the artifact directory of export/FORMAT.md: ONNX graphs, embedding table,
tokenizer files, manifest.json; every graph is run once in ONNX Runtime and compared with PyTorch.

    export_artifacts(checkpoint=CKPT, clip=CLIP, detector=None, out=ART, precision="fp32")

Graphs (inputs -> outputs, f32 at the boundary whatever the precision):

* vision.onnx       pixel_values [B,3,336,336] -> image_embeds [B,576,H], cls_logits [B,2] (with a detector):
                    CLIP up to the penultimate layer, the projector and the detector head in one pass.
* sam_encoder.onnx  pixel_values [B,3,1024,1024] -> image_embeddings [B,256,64,64]
* mask_head.onnx    seg_hidden [N,H], image_embeddings [1,256,64,64] -> low_res_masks [N,256,256], N >= 1:
                    text_hidden_fcs + SAM prompt encoder ([SEG] as one sparse token, dense = no_mask_embed,
                    get_dense_pe as a constant) + mask decoder (multimask_output=False).
* llm.onnx          hand-built, see export/onnx_llm.py; driven by legion_rt/backends/ort_llm.py.

The directory is written next to ``out`` under a temporary name and renamed at the end: a failed export never
leaves a partial artifact directory behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .onnx_llm import EXTERNAL_DATA_THRESHOLD, ExportError, build_llm_graph, rope_theta_of

__all__ = ["ExportError", "export_artifacts", "TOLERANCES", "FORMAT_VERSION"]

FORMAT_VERSION = 1
NUM_IMAGE_TOKENS = 576
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)
CLIP_DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


@dataclass(frozen=True)
class Tolerance:
    """A graph passes when max|ort - torch| <= atol + rtol * max|torch| (rtol lets the same rule hold for the
    7B model, whose activations are larger than those of the random tiny models)."""

    atol: float
    rtol: float

    def limit(self, ref_max: float) -> float:
        return self.atol + self.rtol * ref_max

    def scaled(self, k: float) -> Tolerance:
        return Tolerance(atol=self.atol * k, rtol=self.rtol * k)


# fp32, ONNX Runtime CPU vs PyTorch CPU, random inputs. Measured max abs errors (tiny / small, seed 0):
#   vision 7.8e-7 / 8.9e-7 (|ref| max ~1.2), sam_encoder 3.3e-6 / 3.8e-6 (|ref| ~4.8),
#   mask_head 3.7e-7 / 3.8e-7 (|ref| ~0.3), llm 7.2e-7 / 2.9e-6 (|ref| ~3.4, prefill + 8 steps).
# Limits: atol 2e-5 (5-50x the measured errors) plus rtol 1e-5 of the output's magnitude, because deeper and
# wider real models accumulate more rounding (not measurable here: export_artifacts(tolerance_scale=) widens them).
TOLERANCES = {
    "vision": Tolerance(atol=2e-5, rtol=1e-5),
    "sam_encoder": Tolerance(atol=2e-5, rtol=1e-5),
    "mask_head": Tolerance(atol=2e-5, rtol=1e-5),
    "llm": Tolerance(atol=2e-5, rtol=1e-5),
}
# fp16 graphs against fp32 PyTorch, on the CPU provider when it can run them. Measured (tiny): vision 6.9e-4,
# sam_encoder 2.3e-3, mask_head 3.0e-4, llm 2.5e-3 (|ref| ~0.3-4.7). Limits ~10x.
FP16_TOLERANCE = Tolerance(atol=1e-2, rtol=5e-3)


# ------------------------------------------------------------------------------------------------ progress
class _Progress:
    """One line per step on stderr (or a rich progress bar when rich is installed); silent when disabled."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.done = enabled, total, 0
        self._rich = None
        if enabled:
            try:
                from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

                self._rich = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(),
                    transient=False,
                )
                self._rich.start()
                self._task = self._rich.add_task("export", total=total)
            except ImportError:
                self._rich = None

    def log(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.console.print(msg, soft_wrap=True, highlight=False)
        else:
            print(msg, file=sys.stderr, flush=True)

    @contextmanager
    def step(self, what: str):
        t0 = time.perf_counter()
        if self.enabled and self._rich is not None:
            self._rich.update(self._task, description=what)
        elif self.enabled:
            print(f"[{self.done + 1}/{self.total}] {what} ...", file=sys.stderr, flush=True)
        yield
        self.done += 1
        if self.enabled and self._rich is not None:
            self._rich.update(self._task, advance=1)
            self._rich.console.print(f"[{self.done}/{self.total}] {what}: {time.perf_counter() - t0:.1f} s")
        elif self.enabled:
            print(
                f"[{self.done}/{self.total}] {what}: done in {time.perf_counter() - t0:.1f} s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()


# ------------------------------------------------------------------------------------------- torch modules
def _wrappers(model):
    """nn.Module wrappers with the graph's exact inputs and outputs, built over LegionModel's methods."""
    import torch

    class Vision(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, pixel_values):  # [B,3,336,336] -> [B,576,H], [B,2]
            patches, cls = self.m.clip_features(pixel_values)
            embeds = self.m.project(patches)
            logits = self.m.detect(cls)
            return (embeds, logits) if logits is not None else (embeds,)

    class SamEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, pixel_values):  # [B,3,1024,1024] -> [B,256,64,64]
            return self.m.sam_encode(pixel_values)

    class MaskHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, seg_hidden, image_embeddings):  # [N,H], [1,256,64,64] -> [N,256,256]
            return self.m.mask_head(seg_hidden, image_embeddings)

    return Vision().eval(), SamEncoder().eval(), MaskHead().eval()


def _torch_export(module, args: tuple, path: Path, **kw) -> str:
    with warnings.catch_warnings():
        return _torch_export_quiet(module, args, path, **kw)


def _torch_export_quiet(module, args: tuple, path: Path, *, input_names, output_names, dynamic: dict) -> str:
    """Export ``module`` to ``path`` (embedded weights, or ``path.data`` when over 2 GB).

    ``dynamic``: {input name: {axis: (dim name, min)}}. Uses the torch.export-based exporter; falls back to the
    TorchScript one (opset 17) when it cannot trace the module. Returns the exporter used."""
    import onnx
    import torch

    tmp = path.with_name(path.name + ".export")
    tmp.mkdir()
    # The exporter logs warnings about optional packages (torchvision ops) and deprecations: keep the export quiet.
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        warnings.simplefilter("ignore")
        try:
            shapes = {
                name: {
                    axis: torch.export.Dim(dim, min=lo) for axis, (dim, lo) in dynamic.get(name, {}).items()
                }
                or None
                for name in input_names
            }
            with torch.no_grad():
                program = torch.onnx.export(
                    module,
                    args,
                    dynamo=True,
                    input_names=list(input_names),
                    output_names=list(output_names),
                    dynamic_shapes=shapes,
                    verbose=False,
                    optimize=True,
                )
            program.save(str(tmp / "g.onnx"), external_data=True)
            exporter = f"torch.onnx dynamo (opset {program.model_proto.opset_import[0].version})"
        except Exception as err:  # the dynamo exporter raises many types; the legacy one is the fallback
            print(
                f"note: dynamo export of {path.name} failed ({type(err).__name__}); using the TorchScript exporter",
                file=sys.stderr,
            )
            axes = {name: {axis: dim for axis, (dim, _) in spec.items()} for name, spec in dynamic.items()}
            with torch.no_grad():
                torch.onnx.export(
                    module,
                    args,
                    str(tmp / "g.onnx"),
                    dynamo=False,
                    opset_version=17,
                    input_names=list(input_names),
                    output_names=list(output_names),
                    dynamic_axes=axes,
                )
            exporter = "torch.onnx torchscript (opset 17)"
        proto = onnx.load(str(tmp / "g.onnx"), load_external_data=True)
        _save_onnx(proto, path)
    finally:
        onnx_log.setLevel(level)
        shutil.rmtree(tmp, ignore_errors=True)
    return exporter


def _save_onnx(proto, path: Path) -> None:
    """Save with all weights in ``<name>.data`` when the graph passes protobuf's 2 GB limit, else embedded."""
    import onnx

    size = sum(len(t.raw_data) for t in proto.graph.initializer)
    if size > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(
            proto,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(proto, str(path))


def _to_fp16(path: Path) -> None:
    """Convert a fp32 graph's weights and compute to fp16, keeping f32 inputs/outputs (Cast at the boundary)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = onnx.load(str(path), load_external_data=True)
    proto = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=True)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    _save_onnx(proto, path)


# ---------------------------------------------------------------------------------------------- verification
def _session(path: Path, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@dataclass
class _Check:
    name: str
    max_abs: float
    ref_max: float
    limit: float
    note: str = ""

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs)) and self.max_abs <= self.limit


def _compare(
    name: str, got: list[np.ndarray], want: list[np.ndarray], tol: Tolerance, note: str = ""
) -> _Check:
    err, ref = 0.0, 0.0
    for g, w in zip(got, want, strict=False):
        if g.shape != w.shape:
            raise ExportError(f"{name}: ONNX Runtime output shape {list(g.shape)} != PyTorch {list(w.shape)}")
        err = max(err, float(np.abs(g.astype(np.float64) - w.astype(np.float64)).max()))
        ref = max(ref, float(np.abs(w).max()))
    return _Check(name, err, ref, tol.limit(ref), note)


def _np(t):
    return t.detach().float().cpu().numpy()


def verify_vision(path: Path, vision, seed: int, tol: Tolerance) -> _Check:
    import torch

    g = torch.Generator().manual_seed(seed)
    px = torch.randn(1, 3, 336, 336, generator=g)  # normalized pixels: ~N(0,1)
    with torch.no_grad():
        want = [_np(t) for t in vision(px)]
    got = _session(path).run(None, {"pixel_values": px.numpy()})
    return _compare("vision", got, want, tol)


def verify_sam(path: Path, sam, seed: int, tol: Tolerance) -> tuple[_Check, np.ndarray]:
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    px = torch.randn(1, 3, 1024, 1024, generator=g)
    with torch.no_grad():
        want = _np(sam(px))
    got = _session(path).run(None, {"pixel_values": px.numpy()})
    return _compare("sam_encoder", got, [want], tol), want


def verify_mask_head(
    path: Path, head, hidden_size: int, image_embeddings: np.ndarray, seed: int, tol: Tolerance
) -> _Check:
    """N = 1 and N = 3 [SEG] states (hidden-state-like scale), on a real SAM embedding of the check image."""
    import torch

    g = torch.Generator().manual_seed(seed + 2)
    sess = _session(path)
    checks = []
    for n in (1, 3):
        seg = torch.randn(n, hidden_size, generator=g)
        with torch.no_grad():
            want = _np(head(seg, torch.from_numpy(image_embeddings)))
        got = sess.run(None, {"seg_hidden": seg.numpy(), "image_embeddings": image_embeddings})
        checks.append(_compare("mask_head", got, [want], tol))
    worst = max(checks, key=lambda c: c.max_abs / max(c.limit, 1e-30))
    worst.note = "N=1,3"
    return worst


def verify_llm(
    path: Path, info, llm, seed: int, tol: Tolerance, *, prompt: int = 24, steps: int = 8
) -> _Check:
    """Prefill of ``prompt`` positions in two chunks (prefix, then the rest, through clone_cache), then ``steps``
    greedy decode steps; every step's logits and hidden state against eager PyTorch with a DynamicCache."""
    import torch
    from transformers import DynamicCache

    from legion_rt.backends.ort_llm import OrtLLM

    runner = OrtLLM(_session(path), {"graphs": {"llm": info.to_json()}})
    table = llm.get_input_embeddings().weight.detach().float()
    rng = np.random.default_rng(seed)
    embeds = _np(table[torch.from_numpy(rng.integers(0, info.vocab_size, prompt))])[None]  # [1,P,H]
    split = prompt // 3
    prefix_cache = runner.new_cache(split)
    runner.forward(prefix_cache, embeds[:, :split])
    cache = runner.clone_cache(prefix_cache, prompt + steps)
    got_l, got_h = runner.forward(cache, embeds[:, split:])
    ref_cache = DynamicCache(config=llm.config)
    x = torch.from_numpy(embeds)
    got, want = [], []
    for _ in range(steps + 1):
        with torch.no_grad():
            out = llm(inputs_embeds=x, cache=ref_cache, use_cache=True, output_hidden_states=True)
        ref_cache = out.cache
        want += [_np(out.logits[0, -1]), _np(out.hidden_states[-1][0, -1])]
        got += [got_l, got_h]
        token = int(np.argmax(want[-2]))
        x = table[token][None, None]
        if len(got) < 2 * (steps + 1):
            got_l, got_h = runner.forward(cache, _np(x))
    return _compare("llm", got, want, tol, note=f"prefill {prompt} + {steps} steps")


# -------------------------------------------------------------------------------------------------- manifest
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _clip_preprocess(clip_dir: Path) -> dict:
    """CLIP preprocessing constants, from the CLIP directory's preprocessor_config.json when present."""
    size, mean, std = 336, list(CLIP_DEFAULT_MEAN), list(CLIP_DEFAULT_STD)
    cfg_path = clip_dir / "preprocessor_config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as err:
            raise ExportError(f"{cfg_path}: unreadable preprocessor config ({err})") from None
        mean = [float(v) for v in cfg.get("image_mean", mean)]
        std = [float(v) for v in cfg.get("image_std", std)]
        crop = cfg.get("crop_size", size)
        size = int(crop.get("height", size) if isinstance(crop, dict) else crop)
    if size != 336:
        raise ExportError(f"{cfg_path}: CLIP crop size {size} != 336 (576 image tokens are assumed)")
    return {"size": size, "mean": mean, "std": std}


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    import legion_rt

    return {
        "legion_rt": legion_rt.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


@dataclass
class ExportReport:
    """What export_artifacts measured (also printed): per-graph verification and timings."""

    checks: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- export
def export_artifacts(
    *,
    checkpoint,
    clip,
    out,
    detector=None,
    precision: str = "fp32",
    progress: bool = True,
    verify: bool = True,
    seed: int = 0,
    tolerance_scale: float = 1.0,
) -> Path:
    """Write the artifact directory ``out`` (export/FORMAT.md) from a LEGION checkpoint directory, a CLIP
    directory and an optional detector file. Returns ``out`` as a Path.

    ``precision``: "fp32" (every provider) or "fp16" (weights and compute in fp16, for GPU providers; inputs and
    outputs stay f32). ``verify``: run every graph once in ONNX Runtime (CPU) and compare with PyTorch; raises
    ExportError when a graph is out of tolerance (limits: TOLERANCES x ``tolerance_scale``). An existing ``out`` is replaced only when it is an artifact
    directory (has a manifest.json)."""
    checkpoint, clip, out = Path(checkpoint), Path(clip), Path(out)
    detector = Path(detector) if detector is not None else None
    if precision not in ("fp32", "fp16"):
        raise ExportError(f"precision {precision!r}: expected fp32 or fp16")
    if out.exists() and not (out / "manifest.json").is_file():
        raise ExportError(
            f"{out}: exists and is not an artifact directory (no manifest.json); not overwriting"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    bar = _Progress(progress, total=7 + int(verify) + int(precision == "fp16"))
    try:
        report = _export_into(
            tmp,
            checkpoint=checkpoint,
            clip=clip,
            detector=detector,
            precision=precision,
            verify=verify,
            seed=seed,
            tolerance_scale=tolerance_scale,
            bar=bar,
        )
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the artifact directory gets the usual mode
        if out.exists():  # replace an older artifact directory: swap, then delete the old one
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    bar.log(f"artifacts written to {out} ({sum(report.seconds.values()):.1f} s)")
    return out


class _Timer:
    def __init__(self, report: ExportReport, key: str):
        self.report, self.key = report, key

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.report.seconds[self.key] = time.perf_counter() - self.t0


def _export_into(
    tmp: Path,
    *,
    checkpoint: Path,
    clip: Path,
    detector: Path | None,
    precision: str,
    verify: bool,
    seed: int,
    tolerance_scale: float,
    bar: _Progress,
) -> ExportReport:
    import torch

    from . import tokenizer as tok
    from .checkpoint import load_legion

    report = ExportReport()
    with bar.step("load checkpoint"), _Timer(report, "load"), torch.no_grad():
        model = load_legion(checkpoint, clip, detector=detector)
    graphs = export_graphs(
        model,
        tmp,
        precision=precision,
        verify=verify,
        seed=seed,
        tolerance_scale=tolerance_scale,
        bar=bar,
        report=report,
    )

    with bar.step("write embeddings and tokenizer"), _Timer(report, "tokenizer"):
        table = model.llm.get_input_embeddings().weight.detach().float().numpy()  # [V, H]
        np.save(tmp / "embed_tokens.npy", table.astype(np.float16 if precision == "fp16" else np.float32))
        tok.write_tokenizer_json(checkpoint, tmp / "tokenizer.json")
        for name in TOKENIZER_SIDE_FILES:
            src = checkpoint / name
            if not src.is_file():
                raise ExportError(f"{src}: missing tokenizer file")
            shutil.copyfile(src, tmp / name)
        prefix_ids, suffix_ids = tok.prompt_ids(checkpoint)
        tokens = tok.special_token_ids(checkpoint)

    with bar.step("write manifest"), _Timer(report, "manifest"):
        manifest = _manifest(
            model,
            tmp,
            clip=clip,
            precision=precision,
            graphs=graphs,
            prefix_ids=prefix_ids,
            suffix_ids=suffix_ids,
            tokens=tokens,
            checks=report.checks,
        )
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return report


def export_graphs(
    model,
    out_dir: Path,
    *,
    precision: str = "fp32",
    verify: bool = True,
    seed: int = 0,
    tolerance_scale: float = 1.0,
    bar=None,
    report=None,
) -> dict:
    """Write vision.onnx, sam_encoder.onnx, mask_head.onnx and llm.onnx for ``model`` (a LegionModel) into
    ``out_dir`` and verify them; returns manifest["graphs"]. Raises ExportError when a graph is out of tolerance.
    """
    import torch

    bar = bar or _Progress(False, 0)
    report = report if report is not None else ExportReport()
    model = model.float().eval()  # checkpoints are bf16: export and verify in fp32
    vision, sam, head = _wrappers(model)
    llm = model.llm
    H = int(llm.config.hidden_size)
    has_detector = getattr(model, "prediction_head", None) is not None
    ex = torch.Generator().manual_seed(seed)
    graphs = {}

    def add(name, module, args, inputs, outputs, dynamic):
        exporter = _torch_export(
            module, args, out_dir / f"{name}.onnx", input_names=inputs, output_names=outputs, dynamic=dynamic
        )
        graphs[name] = {"file": f"{name}.onnx", "inputs": inputs, "outputs": outputs, "exporter": exporter}

    with bar.step("export vision.onnx"), _Timer(report, "vision"):
        outs = ["image_embeds", "cls_logits"] if has_detector else ["image_embeds"]
        # example batch 2, so the batch axis stays dynamic (a batch-1 example would pin it)
        px = torch.randn(2, 3, 336, 336, generator=ex)
        add("vision", vision, (px,), ["pixel_values"], outs, {"pixel_values": {0: ("batch", 1)}})
    with bar.step("export sam_encoder.onnx"), _Timer(report, "sam_encoder"):
        px = torch.randn(1, 3, 1024, 1024, generator=ex)
        add("sam_encoder", sam, (px,), ["pixel_values"], ["image_embeddings"], {})
    with bar.step("export mask_head.onnx"), _Timer(report, "mask_head"):
        with torch.no_grad():
            emb = sam(torch.randn(1, 3, 1024, 1024, generator=ex))
        # example N = 3: N stays dynamic (N = 1 is checked in verification)
        add(
            "mask_head",
            head,
            (torch.randn(3, H, generator=ex), emb),
            ["seg_hidden", "image_embeddings"],
            ["low_res_masks"],
            {"seg_hidden": {0: ("num_masks", 1)}},
        )
    with bar.step("build llm.onnx"), _Timer(report, "llm"):
        info = build_llm_graph(llm, out_dir / "llm.onnx", precision=precision)
        graphs["llm"] = {"file": "llm.onnx", **info.to_json()}

    if precision == "fp16":
        with bar.step("convert graphs to fp16"), _Timer(report, "fp16"):
            for name in ("vision", "sam_encoder", "mask_head"):
                _to_fp16(out_dir / graphs[name]["file"])
    if verify:
        with bar.step("verify graphs in ONNX Runtime"), _Timer(report, "verify"):
            if precision == "fp32":
                report.checks = _verify_all(out_dir, vision, sam, head, llm, info, H, seed, tolerance_scale)
            else:
                report.checks = _verify_fp16(
                    out_dir, vision, sam, head, llm, info, H, seed, bar, tolerance_scale
                )
        for c in report.checks:
            bar.log(
                f"  {c.name:<12} max abs err {c.max_abs:.3g} (limit {c.limit:.3g}, |ref| max {c.ref_max:.3g})"
                f"{'  ' + c.note if c.note else ''}"
            )
        bad = [c for c in report.checks if not c.ok]
        if bad:
            c = bad[0]
            raise ExportError(
                f"{c.name}.onnx: ONNX Runtime differs from PyTorch by {c.max_abs:.3g} "
                f"(tolerance {c.limit:.3g}); export aborted"
            )
    return graphs


def _verify_all(tmp, vision, sam, head, llm, info, H, seed, scale) -> list[_Check]:
    def tol(name):
        return TOLERANCES[name].scaled(scale)

    checks = [verify_vision(tmp / "vision.onnx", vision, seed, tol("vision"))]
    sam_check, emb = verify_sam(tmp / "sam_encoder.onnx", sam, seed, tol("sam_encoder"))
    checks.append(sam_check)
    checks.append(verify_mask_head(tmp / "mask_head.onnx", head, H, emb, seed, tol("mask_head")))
    checks.append(verify_llm(tmp / "llm.onnx", info, llm, seed, tol("llm")))
    return checks


def _verify_fp16(tmp, vision, sam, head, llm, info, H, seed, bar, scale) -> list[_Check]:
    """fp16 graphs are meant for GPU providers; ONNX Runtime's CPU provider lacks fp16 kernels for some ops.
    Each graph is checked on CPU when it can run there, and reported as unverified otherwise."""
    tol = FP16_TOLERANCE.scaled(scale)
    checks = []
    fns = [
        ("vision", lambda: verify_vision(tmp / "vision.onnx", vision, seed, tol)),
        ("sam_encoder", lambda: verify_sam(tmp / "sam_encoder.onnx", sam, seed, tol)[0]),
        ("llm", lambda: verify_llm(tmp / "llm.onnx", info, llm, seed, tol)),
    ]
    for name, fn in fns:
        try:
            checks.append(fn())
        except ExportError:
            raise
        except Exception as err:  # NOT_IMPLEMENTED kernels on the CPU provider
            bar.log(
                f"  {name:<12} fp16 not verifiable on the CPU provider ({str(err).splitlines()[0][:120]})"
            )
    try:
        import torch

        with torch.no_grad():
            emb = _np(sam(torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(seed + 1))))
        checks.append(verify_mask_head(tmp / "mask_head.onnx", head, H, emb, seed, tol))
    except ExportError:
        raise
    except Exception as err:
        bar.log(f"  mask_head    fp16 not verifiable on the CPU provider ({str(err).splitlines()[0][:120]})")
    return checks


def _manifest(
    model, art: Path, *, clip: Path, precision, graphs, prefix_ids, suffix_ids, tokens, checks
) -> dict:
    lcfg = model.llm.config
    cfg = model.cfg
    info = graphs["llm"]
    model_block = {
        "name": cfg.name,
        "hidden_size": int(lcfg.hidden_size),
        "num_layers": int(lcfg.num_hidden_layers),
        "num_heads": int(lcfg.num_attention_heads),
        "num_kv_heads": int(info["num_kv_heads"]),
        "head_dim": int(info["head_dim"]),
        "intermediate_size": int(lcfg.intermediate_size),
        "vocab_size": int(lcfg.vocab_size),
        "max_position_embeddings": int(lcfg.max_position_embeddings),
        "rms_norm_eps": float(lcfg.rms_norm_eps),
        "rope_theta": float(rope_theta_of(lcfg)),
        "clip_hidden_size": int(cfg.clip_hidden_size),
        "num_image_tokens": int(cfg.num_image_tokens),
        "sam_embed_dim": int(cfg.prompt_embed_dim),
        "sam_embedding_hw": list(cfg.sam_embedding_hw),
        "low_res_hw": list(cfg.low_res_hw),
    }
    files = {}
    for path in sorted(art.rglob("*")):
        if path.is_file() and path.name != "manifest.json":
            rel = path.relative_to(art).as_posix()
            files[rel] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
    tok_cfg = json.loads((art / "tokenizer_config.json").read_text())
    return {
        "format": "legion_rt.artifacts",
        "format_version": FORMAT_VERSION,
        "producer": _versions(),
        "precision": precision,
        "dtypes": {
            "io": "float32",
            "weights": "float16" if precision == "fp16" else "float32",
            "kv_cache": info["kv_dtype"],
            "embed_tokens": "float16" if precision == "fp16" else "float32",
        },
        "model": model_block,
        "tokens": {k: int(v) for k, v in tokens.items()},
        "prompt": {
            "prefix_ids": [int(i) for i in prefix_ids],
            "suffix_ids": [int(i) for i in suffix_ids],
            "image_token_index": -200,
        },
        "preprocess": {
            "clip": _clip_preprocess(clip),
            "sam": {"size": 1024, "mean": list(SAM_MEAN), "std": list(SAM_STD)},
        },
        "detector": getattr(model, "prediction_head", None) is not None,
        "text": {"clean_up_tokenization_spaces": bool(tok_cfg.get("clean_up_tokenization_spaces", False))},
        "graphs": graphs,
        "verification": {c.name: {"max_abs_err": c.max_abs, "limit": c.limit} for c in checks},
        "files": files,
    }
