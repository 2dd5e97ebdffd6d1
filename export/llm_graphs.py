"""Which LLM graph(s) the export writes (``--llm-graph``), and the check of the second one.

* ``gqa`` (default): llm.onnx of kind ``gqa_shared_kv`` (export/onnx_llm.py), ONNX Runtime's fastest form.
* ``standard``: llm.onnx of kind ``standard_kv`` (export/onnx_llm_standard.py): standard operators only, the one
  TensorRT can build; ONNX Runtime drives it too (legion_rt/backends/ort_llm.py).
* ``both``: llm.onnx (GQA, driven by ONNX Runtime) and llm_standard.onnx (``graphs.llm_standard`` in the manifest,
  what ``legion-rt build-engines`` builds). The second graph is verified like the first (greedy tokens and
  tolerances against PyTorch), recorded as ``verification.llm_standard``.
"""

from __future__ import annotations

from pathlib import Path

from legion_rt.manifest import LlmGraph

from .onnx_llm import ExportError, build_llm_graph
from .onnx_llm_standard import build_standard_llm_graph

LLM_GRAPH_CHOICES = ("gqa", "standard", "both")


def build_llm_graphs(
    llm,
    out_dir: Path,
    *,
    precision: str = "fp32",
    which: str = "gqa",
    weights=None,
    quant=None,
    progress=None,
) -> dict[str, LlmGraph]:
    """The manifest's LLM entries ({"llm": ...} and, for ``both``, "llm_standard") after writing the graphs.
    ``weights`` / ``quant`` / ``progress``: see export/onnx_llm.py build_llm_graph (quantized: the GQA graph only)."""
    out_dir = Path(out_dir)
    if which not in LLM_GRAPH_CHOICES:
        raise ExportError(f"llm graph {which!r}: expected one of {', '.join(LLM_GRAPH_CHOICES)}")
    if which == "standard":
        return {
            "llm": build_standard_llm_graph(llm, out_dir / "llm.onnx", precision=precision, weights=weights)
        }
    graphs = {
        "llm": build_llm_graph(
            llm, out_dir / "llm.onnx", precision=precision, weights=weights, quant=quant, progress=progress
        )
    }
    if which == "both":
        graphs["llm_standard"] = build_standard_llm_graph(
            llm, out_dir / "llm_standard.onnx", precision=precision, weights=weights
        )
    return graphs


def verify_second_llm_graph(out_dir: Path, graphs: dict, llm, seed: int, *, scale: float = 1.0,
                            fp16: bool = False) -> list:  # fmt: skip
    """The verification checks of ``llm_standard.onnx`` (same case and rules as llm.onnx); [] when absent. An
    fp16 graph the CPU provider cannot run is left unverified, as for the other fp16 graphs."""
    info = graphs.get("llm_standard")
    if info is None:
        return []
    from .verify import llm_case, verify_cases

    try:
        case = llm_case(Path(out_dir) / info.file, info, llm, seed)
    except ExportError:
        raise
    except Exception:
        if not fp16:
            raise
        return []
    checks = verify_cases([case], [([llm], [case])], scale=scale, fp16=fp16)  # judged by llm.onnx's rules
    for c in checks:
        c.name = "llm_standard"
    return checks
