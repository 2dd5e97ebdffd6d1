"""What ``legion-rt build-engines`` decides without TensorRT: optimization profiles from the manifest, which layers
stay fp32, and the ``engines.json`` record that gates loading (legion_rt/backends/tensorrt.py builds and loads).

An engine file is executable code for one GPU and one TensorRT version: only engines that this machine built and
recorded in ``engines.json`` are loaded, and each is checked against the record before deserialization:

* the engine file's sha256 (a changed or foreign file is refused),
* the GPU (name and compute capability), the TensorRT version and the machine (``/etc/machine-id``, else the host
  name) it was built on,
* the sha256 of the ONNX graph it was built from, against the artifact directory's manifest now (a re-export
  makes old engines stale).

Every refusal is a ``BackendError`` that ends with "rebuild with `legion-rt build-engines ART`".
"""

from __future__ import annotations

import fnmatch
import hashlib
import platform
from pathlib import Path
from typing import Any

from ..errors import BackendError

RECORD_VERSION = 1
MAX_MASKS = 32  # mask_head optimization profile: N in 1..MAX_MASKS (more [SEG] are run in chunks)
OPT_MASKS = 4
# Layer kinds kept in fp32 in a weakly typed (fp32 graph + FP16 flag) build: reductions (RMSNorm's mean of squares
# overflows fp16 once |x| > 256, which LLaMA's outlier channels reach), normalizations and softmax. The fp16 export
# reached llm 2.5e-3 max error against fp32 with these in fp32 (docs: export/onnx_export.py FP16 tolerances);
# the standard LLM graph of an fp16 export carries these casts itself (strongly typed builds keep them).
FP32_LAYER_TYPES = ("REDUCE", "NORMALIZATION", "SOFTMAX")
FP32_LAYER_NAMES = ("*layernorm*", "*.norm*", "*softmax*", "*rms*")


def rebuild_hint(root: Path | str) -> str:
    return f"rebuild with `legion-rt build-engines {root}`"


def machine_id() -> str:
    """This machine's identity: /etc/machine-id (systemd, also on JetPack), else the host name."""
    try:
        text = Path("/etc/machine-id").read_text().strip()
        if text:
            return text
    except OSError:
        pass
    return platform.node() or "unknown"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def llm_max_context(manifest, max_context: int | None = None) -> int:
    """Positions an LLM engine must hold: ``max_context`` (``--max-context``) or the model's maximum."""
    limit = int(manifest.model.max_position_embeddings)
    if max_context is None:
        return limit
    max_context = int(max_context)
    if not manifest.prompt_length < max_context <= limit:
        raise BackendError(
            f"--max-context {max_context}: must be above the prompt's {manifest.prompt_length} positions and at "
            f"most the model's {limit}"
        )
    return max_context


def optimization_profile(
    manifest, graph: str, inputs: dict[str, tuple[int, ...]], *, max_context: int | None = None
) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """(min, opt, max) shapes of every input of ``graph`` whose shape has dynamic (-1) dimensions.

    ``inputs``: input name -> shape as TensorRT's parser reports it (-1 = dynamic). vision and sam_encoder: batch 1.
    mask_head: ``seg_hidden`` N in 1..MAX_MASKS (opt OPT_MASKS). llm (standard_kv): ``inputs_embeds`` S in
    1..prompt length (opt 1, a decode step), every past K/V P in 0..max_context - 1 (opt: the prompt length).
    Any other dynamic dimension is a BackendError (the graph does not match this runtime)."""
    out = {}
    prompt = manifest.prompt_length
    context = llm_max_context(manifest, max_context) if graph.startswith("llm") else 0
    for name, shape in inputs.items():
        shape = [int(d) for d in shape]
        if all(d >= 0 for d in shape):
            continue
        lo, opt, hi = list(shape), list(shape), list(shape)

        def set_dim(axis: int, a: int, b: int, c: int, name=name, shape=shape, lo=lo, opt=opt, hi=hi) -> None:
            if len(shape) <= axis or shape[axis] != -1:
                raise BackendError(f"{graph}: input {name} {shape}: expected a dynamic dimension {axis}")
            lo[axis], opt[axis], hi[axis] = a, b, c

        if shape and shape[0] == -1:
            set_dim(0, 1, 1, 1)  # batch 1 everywhere (requests run one picture at a time)
        if graph == "mask_head" and name == "seg_hidden":
            set_dim(0, 1, OPT_MASKS, MAX_MASKS)
        elif graph.startswith("llm") and name == "inputs_embeds":
            set_dim(1, 1, 1, prompt)
        elif graph.startswith("llm") and name.startswith("past_key_values."):
            set_dim(2, 0, prompt, context - 1)
        if any(d < 0 for d in lo):
            raise BackendError(
                f"{graph}: input {name} {shape}: no optimization profile for its dynamic dimensions"
            )
        out[name] = (lo, opt, hi)
    return out


def keep_fp32(layer_type: str, layer_name: str, extra: tuple[str, ...] = ()) -> bool:
    """True when a layer stays fp32 in an FP16-flag build: its kind is in FP32_LAYER_TYPES, or its name matches
    FP32_LAYER_NAMES or one of ``extra`` (``--fp32-layers``, shell-style patterns)."""
    kind = str(layer_type).rsplit(".", 1)[-1].upper()
    name = layer_name.lower()
    return kind in FP32_LAYER_TYPES or any(
        fnmatch.fnmatch(name, p.lower()) for p in (*FP32_LAYER_NAMES, *extra)
    )


def new_record(
    *, precision: str, trt_version: str, gpu: str, workspace_gb: float, options: dict
) -> dict[str, Any]:
    return {
        "record_version": RECORD_VERSION,
        "precision": precision,
        "tensorrt": trt_version,
        "gpu": gpu,
        "machine": machine_id(),
        "workspace_gb": workspace_gb,
        "options": options,
        "engines": {},
    }


def add_engine(record: dict, graph: str, file: str, data: bytes, *, source: str, source_sha256: str,
               profile: dict, fp32_layers: int) -> None:  # fmt: skip
    record["engines"][graph] = {
        "file": file,
        "sha256": sha256_bytes(data),
        "bytes": len(data),
        "source": source,
        "source_sha256": source_sha256,
        "profile": {k: [list(x) for x in v] for k, v in profile.items()},
        "fp32_layers": fp32_layers,
    }


def check_record(record: Any, *, root: Path | str, trt_version: str, gpu: str, manifest) -> None:
    """Refuse (BackendError ending in the rebuild hint) a record made elsewhere or for other graphs. ``manifest``:
    the artifact directory's manifest now (its ``files`` hashes)."""
    hint = rebuild_hint(root)
    if not isinstance(record, dict) or record.get("record_version") != RECORD_VERSION:
        raise BackendError(f"engines.json: unknown record format (built by another legion_rt?); {hint}")
    for key, now, what in (
        ("tensorrt", trt_version, "TensorRT"),
        ("gpu", gpu, "GPU"),
        ("machine", machine_id(), "machine"),
    ):
        if record.get(key) != now:
            raise BackendError(
                f"engines.json: built with {what} {record.get(key)!r}, this is {now!r}: engine files are "
                f"executable code for one {what}; {hint}"
            )
    engines = record.get("engines")
    if not isinstance(engines, dict) or not engines:
        raise BackendError(f"engines.json: no engines recorded; {hint}")
    for graph, entry in engines.items():
        listed = manifest.files.get(entry.get("source", ""))
        if listed is None or listed.sha256 != entry.get("source_sha256"):
            raise BackendError(
                f"engines.json: the {graph} engine was built from another {entry.get('source')} than the one in "
                f"this artifact directory (re-exported?); {hint}"
            )


def check_engine_bytes(graph: str, path: Path, data: bytes, entry: dict, root: Path | str) -> None:
    if sha256_bytes(data) != entry.get("sha256"):
        raise BackendError(
            f"{path}: sha256 differs from engines.json (not the engine built here); {rebuild_hint(root)}"
        )
