"""Export a LEGION checkpoint to the artifact directory of docs/FORMAT.md: ONNX graphs, embedding table,
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
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from legion_rt.manifest import (
    CLIP_MEAN,
    CLIP_STD,
    FORMAT_VERSION,
    PRECISIONS,
    SAM_MEAN,
    SAM_SIZE,
    SAM_STD,
    FileEntry,
    Graph,
    Graphs,
    Manifest,
    Normalization,
    Preprocess,
    Prompt,
    TokenIds,
)

from . import graphs as torch_graphs
from . import truncated
from .llm_graphs import build_llm_graphs, verify_second_llm_graph
from .memory import check_export_memory, choose_streaming
from .onnx_llm import ExportError, check_checkpoint_head_dim, llm_model_info
from .progress import Progress
from .quantize import QUANTIZED_PRECISIONS, check_matmul_nbits, quantization_record, quantize_llm
from .verify import verify_graphs

__all__ = ["ExportError", "export_artifacts", "FORMAT_VERSION"]

NUM_IMAGE_TOKENS = 576
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


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
    memory_limit: int | None = None,
    llm_graph: str = "gqa",
    stream_llm: bool | None = None,
) -> Path:
    """Write the artifact directory ``out`` (docs/FORMAT.md) from a LEGION checkpoint directory, a CLIP
    directory and an optional detector file. Returns ``out`` as a Path.

    ``precision``: "fp32" (every provider), "fp16" (weights and compute in fp16, for GPU providers; inputs and
    outputs stay f32), "int8" / "int4" (llm.onnx's linear weights quantized, export/quantize.py). ``verify``: run every graph in ONNX Runtime (CPU) on seeded inputs and judge it against
    PyTorch (see "How a graph is judged" in export/verify.py; ``tolerance_scale`` multiplies every limit); raises
    ExportError when a graph fails. ``memory_limit``: bytes the export may use (None: what the machine has
    available); an export estimated to need more is refused before any weight is read. An existing ``out`` is
    replaced only when it is an artifact directory (has a manifest.json). ``llm_graph``: "gqa" | "standard" | "both",
    which LLM graph(s) to write (export/llm_graphs.py). ``stream_llm``: build llm.onnx one weight at a time from the
    checkpoint files instead of from an LLM loaded in float32 (None: when the loaded export would not fit in memory,
    as for the released 7B); a streamed LLM is verified on its first layers (export/truncated.py) and quantized
    one weight at a time."""
    checkpoint, clip, out = Path(checkpoint), Path(clip), Path(out)
    detector = Path(detector) if detector is not None else None
    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if out.exists() and not (out / "manifest.json").is_file():
        raise ExportError(
            f"{out}: exists and is not an artifact directory (no manifest.json); not overwriting"
        )
    # Refuse early, with a message, rather than be killed by the kernel after minutes of loading.
    check_checkpoint_head_dim(checkpoint)
    if precision in QUANTIZED_PRECISIONS:  # this ONNX Runtime quantizes and runs MatMulNBits
        if llm_graph != "gqa":
            raise ExportError(f"--precision {precision} quantizes the GQA llm.onnx only; use --llm-graph gqa")
        check_matmul_nbits(precision)
    stream_llm = choose_streaming(checkpoint, clip, detector, precision=precision, verify=verify,
                                  limit=memory_limit, stream_llm=stream_llm)  # fmt: skip
    check_export_memory(checkpoint, clip, detector, precision=precision, verify=verify, limit=memory_limit,
                        stream_llm=stream_llm)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    quant_step = precision in QUANTIZED_PRECISIONS and (
        verify or not stream_llm
    )  # streamed: quantized when built
    bar = Progress(progress, total=7 + int(verify) + int(precision == "fp16" or quant_step))
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
            llm_graph=llm_graph,
            stream_llm=stream_llm,
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


@dataclass
class ExportReport:
    """What export_artifacts measured (also printed): per-graph verification and timings."""

    checks: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)


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
    bar: Progress,
    llm_graph: str = "gqa",
    stream_llm: bool = False,
) -> ExportReport:
    import torch

    from . import tokenizer as tok
    from .checkpoint import load_legion

    report = ExportReport()
    with bar.step("load checkpoint"), _Timer(report, "load"), torch.no_grad():
        model = load_legion(checkpoint, clip, detector=detector, stream_llm=stream_llm)
    graphs = export_graphs(
        model,
        tmp,
        precision=precision,
        verify=verify,
        seed=seed,
        tolerance_scale=tolerance_scale,
        bar=bar,
        report=report,
        llm_graph=llm_graph,
    )

    with bar.step("write embeddings and tokenizer"), _Timer(report, "tokenizer"):
        table = model.llm.get_input_embeddings().weight.detach().float().numpy()  # [V, H]
        np.save(tmp / "embed_tokens.npy", table.astype(np.float32 if precision == "fp32" else np.float16))
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
        (tmp / "manifest.json").write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
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
    llm_graph: str = "gqa",
) -> Graphs:
    """Write vision.onnx, sam_encoder.onnx, mask_head.onnx and llm.onnx for ``model`` (a LegionModel) into
    ``out_dir`` and verify them; returns the manifest's ``graphs`` block. Raises ExportError when a graph is out of tolerance.
    """
    import torch

    bar = bar or Progress(False, 0)
    report = report if report is not None else ExportReport()
    model = model.float().eval()  # checkpoints are bf16: export and verify in fp32
    vision, sam, head = torch_graphs.graph_wrappers(model)
    llm = model.llm
    H = int(llm.config.hidden_size)
    has_detector = getattr(model, "prediction_head", None) is not None
    ex = torch.Generator().manual_seed(seed)
    graphs = {}

    def add(name, module, args, inputs, outputs, dynamic):
        exporter = torch_graphs.torch_export(
            module, args, out_dir / f"{name}.onnx", input_names=inputs, output_names=outputs, dynamic=dynamic
        )
        graphs[name] = Graph(
            file=f"{name}.onnx",
            inputs=tuple(inputs),
            outputs=tuple(outputs),
            precision="fp16" if precision == "fp16" else "fp32",
            exporter=exporter,
        )

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
    streamed = truncated.is_streamed(model)
    # int8/int4: the fp32 graph first (verified like any fp32 export), quantized at the end; a streamed LLM is
    # quantized as it is written (its fp32 graph would not fit), and its first layers are checked instead.
    quant = quantization_record(precision) if streamed and precision in QUANTIZED_PRECISIONS else None
    with (
        bar.step(f"build llm.onnx{' (streamed from the checkpoint)' if streamed else ''}"),
        _Timer(report, "llm"),
    ):
        graphs.update(
            build_llm_graphs(
                llm,
                out_dir,
                precision="fp16" if precision == "fp16" else "fp32",
                which=llm_graph,
                weights=model.llm_weights if streamed else None,
                quant=quant,
                progress=lambda done, total: bar.detail("build llm.onnx: decoder layer", done, total),
            )
        )
        info = graphs["llm"]

    if precision == "fp16":
        with bar.step("convert graphs to fp16"), _Timer(report, "fp16"):
            for name in ("vision", "sam_encoder", "mask_head"):
                torch_graphs.to_fp16(out_dir / graphs[name].file)
    if verify:
        with bar.step("verify graphs in ONNX Runtime"), _Timer(report, "verify"):
            report.checks = verify_graphs(
                out_dir, model, info, seed, scale=tolerance_scale, fp16=precision == "fp16", bar=bar
            ) + _verify_second(out_dir, graphs, model, seed, tolerance_scale, precision == "fp16")
        for c in report.checks:
            bar.log("  " + c.line())
        bad = [c for c in report.checks if not c.ok]
        if bad:
            c = bad[0]
            if not c.argmax_ok:
                raise ExportError(
                    f"{c.name}.onnx: greedy tokens of ONNX Runtime differ from PyTorch ({c.argmax}); export aborted"
                )
            raise ExportError(
                f"{c.name}.onnx: ONNX Runtime differs from the reference by {c.max_abs:.3g} on {c.output} "
                f"(limit {c.limit:.3g}, rule {c.rule}); export aborted"
            )
    if precision in QUANTIZED_PRECISIONS and streamed:
        _verify_streamed_quantization(out_dir, model, quant, verify, seed, tolerance_scale, bar, report)
    elif precision in QUANTIZED_PRECISIONS:
        graphs["llm"] = _quantize_llm_step(
            out_dir, llm, info, precision, verify, seed, tolerance_scale, bar, report
        )
    return Graphs(**graphs)


def _verify_second(out_dir, graphs, model, seed, scale, fp16) -> list:
    """verify_second_llm_graph; for a streamed LLM on its first layers' standard graph (export/truncated.py)."""
    if not truncated.is_streamed(model) or "llm_standard" not in graphs:
        return verify_second_llm_graph(out_dir, graphs, model.llm, seed, scale=scale, fp16=fp16)
    from .onnx_llm_standard import build_standard_llm_graph

    llm = truncated.truncated_llm(model)
    with truncated.side_dir(out_dir) as side:
        info = build_standard_llm_graph(
            llm, side / "llm_standard.onnx", precision=graphs["llm_standard"].precision
        )
        checks = verify_second_llm_graph(side, {"llm_standard": info}, llm, seed, scale=scale, fp16=fp16)
    for c in checks:
        c.note += "; " + truncated.truncated_note(model)
    return checks


def _verify_streamed_quantization(out_dir, model, quant, verify, seed, scale, bar, report) -> None:
    """The quantization check of a streamed LLM (llm.onnx was quantized as it was written): the same builder writes
    the first layers in fp32 and quantized, judged by rule quant_dequant like any quantized llm.onnx."""
    if not verify:
        return
    from .onnx_llm import build_llm_graph
    from .quantize import verify_quantized

    with bar.step(f"verify the int{quant.bits} quantization"), _Timer(report, "quantize"):
        llm = truncated.truncated_llm(model)
        table = model.llm.get_input_embeddings().weight.detach().float().numpy()
        with truncated.side_dir(out_dir) as side:
            fp32_info = build_llm_graph(llm, side / "llm.onnx", precision="fp32")
            q_info = build_llm_graph(llm, side / "llm_q.onnx", quant=quant)
            check = verify_quantized(side / "llm_q.onnx", side / "llm.onnx", llm_model_info(llm), fp32_info,
                                     q_info, table, seed=seed, scale=scale)  # fmt: skip
    check.note += "; " + truncated.truncated_note(model)
    _record_quant_check(report, bar, check, f"int{quant.bits}")


def _record_quant_check(report, bar, check, precision) -> None:
    for c in report.checks:
        if c.name == "llm":
            c.name = "llm_fp32_source"
    report.checks.append(check)
    bar.log("  " + check.line())
    if not check.ok:
        what = check.argmax if not check.argmax_ok else f"max abs err {check.max_abs:.3g} on {check.output}"
        raise ExportError(
            f"llm.onnx ({precision}) fails rule {check.rule} ({what}; limit {check.limit:.3g}); export aborted"
        )


def _quantize_llm_step(out_dir, llm, info, precision, verify, seed, scale, bar, report):
    """int8/int4 (export/quantize.py): quantize the verified fp32 llm.onnx, judge it against that source."""
    with bar.step(f"quantize llm.onnx ({precision})"), _Timer(report, "quantize"):
        table = llm.get_input_embeddings().weight.detach().float().cpu().numpy()
        new, check = quantize_llm(out_dir / "llm.onnx", info, llm_model_info(llm), precision, table=table,
                                  verify=verify, seed=seed, scale=scale)  # fmt: skip
    if check is not None:
        _record_quant_check(report, bar, check, precision)
    return new


def _manifest(
    model, art: Path, *, clip: Path, precision, graphs: Graphs, prefix_ids, suffix_ids, tokens, checks
) -> Manifest:
    cfg = model.cfg
    files = {}
    for path in sorted(art.rglob("*")):
        if path.is_file() and path.name != "manifest.json":
            rel = path.relative_to(art).as_posix()
            files[rel] = FileEntry(sha256=_sha256(path), bytes=path.stat().st_size)
    manifest = Manifest(
        precision=precision,
        model=llm_model_info(
            model.llm,
            name=cfg.name,
            clip_hidden_size=cfg.clip_hidden_size,
            num_image_tokens=cfg.num_image_tokens,
            sam_embed_dim=cfg.prompt_embed_dim,
            sam_embedding_hw=cfg.sam_embedding_hw,
            low_res_hw=cfg.low_res_hw,
        ),
        tokens=TokenIds(**{k: int(v) for k, v in tokens.items()}),
        prompt=Prompt(
            prefix_ids=tuple(int(i) for i in prefix_ids), suffix_ids=tuple(int(i) for i in suffix_ids)
        ),
        preprocess=Preprocess(
            clip=_clip_preprocess(clip),
            sam=Normalization(size=SAM_SIZE, mean=SAM_MEAN, std=SAM_STD),
        ),
        detector=getattr(model, "prediction_head", None) is not None,
        graphs=graphs,
        files=files,
        producer=_versions(),
        verification={c.name: c.to_json() for c in checks},
    )
    manifest.validate(str(art / "manifest.json"))
    return manifest


# -------------------------------------------------------------------------------------------------- manifest
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _clip_preprocess(clip_dir: Path) -> Normalization:
    """CLIP preprocessing constants, from the CLIP directory's preprocessor_config.json when present."""
    size, mean, std = 336, list(CLIP_MEAN), list(CLIP_STD)
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
    return Normalization(size=size, mean=tuple(mean), std=tuple(std))


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
