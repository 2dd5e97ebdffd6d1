"""The vision, SAM encoder and mask head graphs from PyTorch: nn.Module wrappers with each graph's exact inputs and
outputs, torch.onnx export (the torch.export-based exporter, TorchScript as the fallback), saving with external
data past protobuf's 2 GB limit, and the fp16 conversion. The LLM graph is built by hand in export/onnx_llm.py."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import sys
import warnings
from pathlib import Path

from .onnx_llm import EXTERNAL_DATA_THRESHOLD


def graph_wrappers(model):
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


def torch_export(module, args: tuple, path: Path, **kw) -> str:
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
    # The exporter logs warnings about optional packages (torchvision ops) and deprecations, and its optimizer
    # (onnx_ir, onnxscript) logs every pass at INFO once anything (ONNX Runtime's quantizer) has configured the
    # root logger: keep the export quiet.
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
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
        save_onnx(proto, path)
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)
        shutil.rmtree(tmp, ignore_errors=True)
    return exporter


def save_onnx(proto, path: Path) -> None:
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
        # onnx writes the data file with mode 0600: give it the graph file's mode (found on the 7B-shaped export:
        # a service running as another user could read sam_encoder.onnx but not its weights)
        os.chmod(path.with_name(path.name + ".data"), stat.S_IMODE(os.stat(path).st_mode))
    else:
        onnx.save_model(proto, str(path))


def to_fp16(path: Path) -> None:
    """Convert a fp32 graph's weights and compute to fp16, keeping f32 inputs/outputs (Cast at the boundary)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = onnx.load(str(path), load_external_data=True)
    proto = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=True)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    save_onnx(proto, path)
