"""What the export verifies of an LLM it streams (load_legion(stream_llm=True): a 7B whose float32 copy does not fit
beside PyTorch and ONNX Runtime): the first ``TRUNCATED_LAYERS`` decoder layers, the final norm and lm_head, as a
LlamaForCausalLM of that depth holding the checkpoint's real weights, written by the same graph builder and judged
by the same rules (export/verify.py, export/quantize.py) as any llm.onnx.

What that proves: the builder's code on the real shapes and weights (every layer of llm.onnx comes from the same
loop), the quantizer on real weight matrices, the final norm and lm_head. What it does not: the bytes of the other
layers in llm.onnx.data; benchmarks/full_size.py runs the whole exported graph against PyTorch bf16 for that.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path

TRUNCATED_LAYERS = 2


def truncated_llm(model, layers: int = TRUNCATED_LAYERS):
    """A float32 LlamaForCausalLM with the first ``layers`` decoder layers of a streamed ``model`` (a LegionModel
    loaded with stream_llm=True), its final norm, lm_head and embedding table. Built once per model and depth: the
    export's LLM checks (fp32 / fp16, quantization, the standard graph) share it rather than read the shards again."""
    import torch

    cache = model.__dict__.setdefault("_truncated_llms", {})
    if layers in cache:
        return cache[layers]

    from .model.llm import build_llm, fix_llm_buffers

    cfg = model.cfg.replace(num_layers=min(layers, model.cfg.num_layers))
    with torch.device("meta"):
        llm = build_llm(cfg)
    state = {}
    for name in llm.state_dict():
        if name.startswith("model.embed_tokens."):
            state[name] = model.llm.model.embed_tokens.weight
        else:
            state[name] = model.llm_weights[name]
    llm.load_state_dict(state, assign=True, strict=True)
    fix_llm_buffers(llm)
    cache[layers] = llm.eval().requires_grad_(False)
    return llm


def is_streamed(model) -> bool:
    return getattr(model, "llm_weights", None) is not None


def truncated_note(model) -> str:
    return (
        f"first {min(TRUNCATED_LAYERS, model.cfg.num_layers)} of {model.cfg.num_layers} layers (streamed LLM)"
    )


@contextmanager
def side_dir(out_dir: Path):
    """A scratch directory inside the export's directory, removed before the manifest lists the files."""
    with tempfile.TemporaryDirectory(prefix=".verify-", dir=out_dir, ignore_cleanup_errors=True) as d:
        yield Path(d)
