"""The export's memory budget: an estimate of its peak from the checkpoint's tensor shapes (no weights read), and
the check that refuses an export which would not fit, before any weight is read."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from .onnx_llm import EXTERNAL_DATA_THRESHOLD, ExportError

GiB = 1024**3


def available_memory() -> int:
    """Bytes this process can still allocate: MemAvailable, capped by the cgroup (container) limit."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            room = int(limit) - used
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    if avail is None:  # not Linux: assume the physical memory size
        try:
            avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            avail = 1 << 62
    return int(avail)


@dataclass
class MemoryEstimate:
    """Peak resident bytes of an export, estimated from the checkpoint's tensor shapes (no weights read).

    model: every loaded parameter in float32 (load_legion loads fp32 whatever ``precision``; with a streamed LLM,
    all but its decoder layers, norm and lm_head, which are read one tensor at a time); steps: the largest
    extra of one step on top of it: building llm.onnx (its initializers held in memory when the graph stays under
    2 GB, streamed to llm.onnx.data otherwise), the torch.onnx exports of the other graphs (about 2 copies of their
    weights), verification (ONNX Runtime holds every graph's weights while PyTorch holds the model); base: Python,
    torch and ONNX Runtime themselves."""

    model: int
    steps: dict
    base: int = 1 * GiB

    @property
    def total(self) -> int:
        return self.model + max(self.steps.values(), default=0) + self.base

    def describe(self) -> str:
        step = max(self.steps, key=self.steps.get)
        return (
            f"fp32 weights {self.model / GiB:.1f} GB + {step} {self.steps[step] / GiB:.1f} GB "
            f"+ {self.base / GiB:.0f} GB"
        )


def estimate_export_memory(checkpoint, clip, detector=None, *, precision: str = "fp32", verify: bool = True,
                           stream_llm: bool = False):  # fmt: skip
    """MemoryEstimate of ``export_artifacts`` with these arguments (reads file headers only)."""
    from .checkpoint import (
        _clip_sources,
        _detector_sources,
        checkpoint_key_to_param,
        directory_metadata,
        read_legion_config,
    )

    checkpoint, clip = Path(checkpoint), Path(clip)
    infos = directory_metadata(checkpoint)
    cfg = read_legion_config(checkpoint, clip, infos)
    numel = {"llm_graph": 0, "embed": 0, "other": 0}
    largest = layer = 0
    for key, info in infos.items():
        param = checkpoint_key_to_param(key)
        if param is None or param.startswith("?"):
            continue
        n = math.prod(info.shape)
        if param.startswith("llm.model.embed_tokens"):
            numel["embed"] += n
        elif param.startswith("llm."):
            numel["llm_graph"] += n
            largest = max(largest, n)
            layer += n if param.startswith("llm.model.layers.0.") else 0
        else:
            numel["other"] += n
    clip_infos, clip_map = _clip_sources(clip, cfg)
    numel["other"] += sum(
        math.prod(i.shape) for k, i in clip_infos.items() if (clip_map.get(k) or "?")[0] != "?"
    )
    if detector is not None:
        det_infos, det_map = _detector_sources(Path(detector))
        numel["other"] += sum(math.prod(det_infos[k].shape) for k in det_map)
    wbytes = 2 if precision == "fp16" else 4
    graph = numel["llm_graph"] * wbytes
    steps = {
        # held initializers + their serialized copy, or (external data) one tensor transposed at a time (and
        # the one-MatMul graph of the quantizer when streamed)
        "building llm.onnx": 2 * graph
        if graph <= EXTERNAL_DATA_THRESHOLD
        else (3 + 2 * stream_llm) * largest * 4,
        "exporting the vision/SAM graphs": 2 * numel["other"] * 4,
    }
    if precision == "fp16":
        steps["converting graphs to fp16"] = 3 * numel["other"] * 4
    if verify and not stream_llm:
        steps["verification (ONNX Runtime sessions)"] = graph + numel["other"] * wbytes + 256 * 1024**2
    elif verify:
        # the truncated LLM (export/truncated.py): float32 + its float64 copy + its ORT graph (x2 quantized: the
        # fp32 source and dequantized twin run beside the quantized one), the vision/SAM graphs in ONNX Runtime
        head = (numel["llm_graph"] - 32 * layer if layer else largest) * 4  # lm_head + norm, roughly
        trunc = 2 * layer * 4 + head + numel["embed"] * 4
        steps["verification (ONNX Runtime sessions)"] = 4 * trunc + numel["other"] * wbytes + 256 * 1024**2
    llm_loaded = numel["embed"] if stream_llm else numel["embed"] + numel["llm_graph"]
    return MemoryEstimate(model=(numel["other"] + llm_loaded) * 4, steps=steps)


def choose_streaming(checkpoint, clip, detector, *, precision: str, verify: bool, limit: int | None,
                     stream_llm: bool | None) -> bool:  # fmt: skip
    """Whether the export streams the LLM (export/truncated.py): as asked, or (None) when the export with the LLM
    loaded in float32 would not fit in ``limit`` bytes (None: what this machine has available now)."""
    if stream_llm is not None:
        return bool(stream_llm)
    avail = available_memory() if limit is None else int(limit)
    return (
        estimate_export_memory(checkpoint, clip, detector, precision=precision, verify=verify).total > avail
    )


def check_export_memory(
    checkpoint, clip, detector, *, precision: str, verify: bool, limit: int | None, stream_llm: bool = False
) -> None:
    """Raise ExportError (one line, before any weight is read) when the export would not fit in ``limit`` bytes
    (None: what this machine has available now) instead of being killed by the kernel half-way."""
    avail = available_memory() if limit is None else int(limit)
    need = estimate_export_memory(checkpoint, clip, detector, precision=precision, verify=verify,
                                  stream_llm=stream_llm)  # fmt: skip
    if need.total <= avail:
        return
    hints = []
    for prec, ver, how in (("fp16", verify, "--precision fp16"), (precision, False, "verify=False")):
        if (prec, ver) != (precision, verify):
            alt = estimate_export_memory(checkpoint, clip, detector, precision=prec, verify=ver,
                                         stream_llm=stream_llm).total  # fmt: skip
            if alt <= avail:
                hints.append(f"{how} needs about {alt / GiB:.1f} GB")
    hint = "; ".join(hints) if hints else f"run it on a machine with at least {need.total / GiB:.0f} GB free"
    raise ExportError(
        f"{checkpoint}: exporting needs about {need.total / GiB:.1f} GB of memory ({need.describe()}) but only "
        f"{avail / GiB:.1f} GB are available; {hint}"
    )
