"""The LLM graph (llm.onnx), built node by node with onnx.helper from a transformers LlamaForCausalLM.

Why hand-built instead of torch.onnx.export: ONNX Runtime's contrib op ``com.microsoft.GroupQueryAttention``
applies rotary embeddings, appends the new K/V rows into a KV buffer *in place* (when past and present are the
same buffer, bound through IOBinding) and attends over the filled positions only. A decode step then costs the
weights plus the filled part of the cache, never a copy of the whole cache (ms/token at 1024 vs 128 context).

Graph contract (kind ``"gqa_shared_kv"``, one graph for prefill and decode, batch 1 at a time):

inputs
    inputs_embeds            f32 [B, S, H]                      embeddings of the S new positions
    past_key_values.{i}.key   T  [B, KVH, MAX, D]  (i = layer)  the KV buffer, MAX = cache capacity
    past_key_values.{i}.value T  [B, KVH, MAX, D]
    seqlens_k                int32 [B]    number of filled positions after this call, minus 1
    total_sequence_length    int32 []     number of filled positions after this call
outputs
    logits                   f32 [B, V]   logits of the last position
    hidden                   f32 [B, H]   final-norm hidden state of the last position
    present.{i}.key/value     T  [B, KVH, MAX, D]  the same buffer as the past input (bind one OrtValue to both)

T is float32 (precision fp32) or float16 (fp16; inputs/outputs stay f32, Cast nodes at the boundary).
The S new positions are the absolute positions [seqlens_k + 1 - S, seqlens_k + 1): rotary uses them, and the
new K/V rows are written there.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from legion_rt.errors import LegionError
from legion_rt.manifest import LlmGraph, ModelInfo

LLM_GRAPH_KIND = "gqa_shared_kv"
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB limit, with room for the graph itself


class ExportError(LegionError):
    """The export stage cannot produce a correct artifact (unsupported model, graph out of tolerance...)."""


def llm_model_info(
    llm,
    *,
    name: str = "llm",
    max_positions: int | None = None,
    clip_hidden_size: int = 0,
    num_image_tokens: int = 576,
    sam_embed_dim: int = 256,
    sam_embedding_hw: tuple[int, int] = (64, 64),
    low_res_hw: tuple[int, int] = (256, 256),
) -> ModelInfo:
    """The manifest's ``model`` block for a LlamaForCausalLM (the vision sizes are given by the caller; the
    defaults suit a standalone LLM graph in tests and verification)."""
    cfg = llm.config
    nh = int(cfg.num_attention_heads)
    return ModelInfo(
        name=name,
        hidden_size=int(cfg.hidden_size),
        num_layers=int(cfg.num_hidden_layers),
        num_heads=nh,
        num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or nh),
        head_dim=int(getattr(cfg, "head_dim", None) or int(cfg.hidden_size) // nh),
        intermediate_size=int(cfg.intermediate_size),
        vocab_size=int(cfg.vocab_size),
        max_position_embeddings=int(max_positions or cfg.max_position_embeddings),
        rms_norm_eps=float(cfg.rms_norm_eps),
        rope_theta=float(rope_theta_of(cfg)),
        clip_hidden_size=int(clip_hidden_size),
        num_image_tokens=int(num_image_tokens),
        sam_embed_dim=int(sam_embed_dim),
        sam_embedding_hw=tuple(int(v) for v in sam_embedding_hw),
        low_res_hw=tuple(int(v) for v in low_res_hw),
    )


# ONNX Runtime's CPU GroupQueryAttention refuses other head sizes at the first run ("head_size shall be a multiple
# of 16", measured with onnxruntime 1.32: 8, 12, 20, 24, 40 refused; 16, 32, 48, 64, 128 run). The export verifies
# llm.onnx on the CPU provider, so such a model would fail only after the whole export.
GQA_HEAD_SIZE_MULTIPLE = 16


def check_llm_head_dim(head_dim: int, where: str = "LLM") -> None:
    """ExportError (one line) when ONNX Runtime's GroupQueryAttention cannot run heads of ``head_dim``."""
    if head_dim <= 0 or head_dim % GQA_HEAD_SIZE_MULTIPLE:
        raise ExportError(
            f"{where}: head size {head_dim} is not a multiple of {GQA_HEAD_SIZE_MULTIPLE}, which ONNX Runtime's "
            "GroupQueryAttention (CPU) requires; this LLM cannot be exported"
        )


def check_checkpoint_head_dim(checkpoint_dir) -> None:
    """``check_llm_head_dim`` from the checkpoint's config.json alone (no weights read). A missing or incomplete
    config.json is left to the loader, which names what is wrong."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        return
    from .config import read_json

    cfg = read_json(path)
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0:
        return
    check_llm_head_dim(int(cfg.get("head_dim") or hidden // heads), f"{path}")


def rope_theta_of(config) -> float:
    """rope theta from a transformers 4.x (``rope_theta``) or 5.x (``rope_parameters``) LlamaConfig."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in (None, "default"):
        raise ExportError(f"rope_type {rope_type!r}: only plain (default) rotary embeddings are supported")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ExportError("LLM config has no rope_theta")
    return float(theta)


def rotary_tables(head_dim: int, theta: float, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches [max_positions, head_dim/2], computed exactly like transformers' LlamaRotaryEmbedding
    (float32 inv_freq, float32 position x inv_freq, then cos/sin in float32), so rotary matches bit for bit."""
    import torch

    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
    pos = torch.arange(max_positions, dtype=torch.int64).to(torch.float32)
    freqs = pos[:, None] * inv_freq[None, :]  # [P, D/2]
    return freqs.cos().numpy(), freqs.sin().numpy()


class _Weights:
    """Collects initializers; streams them to one external data file when the graph would pass 2 GB."""

    def __init__(self, np_dtype, data_path: Path | None):
        self.np_dtype = np_dtype
        self.initializers = []
        self.data_path = data_path
        self._file = open(data_path, "wb") if data_path is not None else None
        self._offset = 0

    def add(self, name: str, array: np.ndarray, *, keep_dtype: bool = False) -> str:
        import onnx
        from onnx import numpy_helper

        arr = np.asarray(array if keep_dtype else array.astype(self.np_dtype, copy=False))
        arr = arr.copy(order="C") if not arr.flags.c_contiguous else arr  # (ascontiguousarray makes 0-d 1-d)
        if self._file is None or arr.nbytes < 1024:
            self.initializers.append(numpy_helper.from_array(arr, name))
            return name
        # Align every tensor to 64 bytes so ONNX Runtime can map the file without copies.
        pad = (-self._offset) % 64
        self._file.write(b"\0" * pad)
        self._offset += pad
        self._file.write(arr.tobytes())
        tensor = onnx.TensorProto()
        tensor.name = name
        tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
        tensor.dims.extend(arr.shape)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (
            ("location", self.data_path.name),
            ("offset", self._offset),
            ("length", arr.nbytes),
        ):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self._offset += arr.nbytes
        self.initializers.append(tensor)
        return name

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


@dataclass
class _Builder:
    nodes: list = field(default_factory=list)
    count: int = 0

    def op(
        self, op_type: str, inputs: list[str], n_out: int = 1, *, domain: str = "", name: str = "", **attrs
    ):
        import onnx

        self.count += 1
        base = f"{name or op_type}_{self.count}"
        outs = [f"{base}/out{k}" for k in range(n_out)]
        self.nodes.append(onnx.helper.make_node(op_type, inputs, outs, name=base, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs


def _np(t) -> np.ndarray:
    return t.detach().to("cpu").float().numpy()


def llm_param_bytes(llm, precision: str, quant=None) -> int:
    """Bytes of llm.onnx's weights (embed_tokens is not in the graph: it is embed_tokens.npy). ``quant``: a
    Quantization record (packed bits plus one float32 scale per block), else 2 (fp16) or 4 bytes per weight."""
    per = 2 if precision == "fp16" else 4
    if quant is not None:
        per = quant.bits / 8 + 4 / quant.block_size
    return int(sum(p.numel() for n, p in llm.named_parameters() if "embed_tokens" not in n) * per)


def llm_dims(llm, precision: str, max_positions: int | None = None) -> tuple:
    """(H, L, NH, KVH, D, V, eps, rope_theta, P) of a LlamaForCausalLM, after the checks every LLM graph kind
    needs (precision, SiLU, an even head size for rotary); raises ExportError."""
    cfg = llm.config
    if precision not in ("fp32", "fp16"):
        raise ExportError(f"precision {precision!r}: expected fp32 or fp16")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ExportError(f"LLM hidden_act {cfg.hidden_act!r}: only silu (LLaMA) is supported")
    H = int(cfg.hidden_size)
    NH = int(cfg.num_attention_heads)
    D = int(getattr(cfg, "head_dim", None) or H // NH)
    if D % 2:
        raise ExportError(f"head_dim {D} is odd: rotary embeddings need an even head size")
    return (
        H,
        int(cfg.num_hidden_layers),
        NH,
        int(getattr(cfg, "num_key_value_heads", None) or NH),
        D,
        int(cfg.vocab_size),
        float(cfg.rms_norm_eps),
        rope_theta_of(cfg),
        int(max_positions or cfg.max_position_embeddings),
    )


def build_llm_graph(
    llm,
    out_path: str | os.PathLike,
    *,
    precision: str = "fp32",
    max_positions: int | None = None,
    weights=None,
    quant=None,
    progress=None,
):
    """Write llm.onnx (and llm.onnx.data when the weights pass 2 GB) for ``llm`` (a LlamaForCausalLM).

    Returns its ``graphs.llm`` manifest entry (``legion_rt.manifest.LlmGraph``); the model sizes go in the
    ``model`` block (``llm_model_info``). Raises ExportError for models it cannot represent.

    ``weights``: where the tensors come from (``llm.state_dict()`` by default; a StreamedLlmWeights when ``llm``
    sits on the meta device): every tensor is read, converted and written to the data file one at a time.
    ``quant``: a Quantization record (precision fp32 only): every linear weight becomes a MatMulNBits as it is
    written (export/quantize.py quantize_weight; lm_head with ``quant.lm_head_bits``, or float32), so a
    quantized 7B never exists as a float32 graph. ``progress(done, total)``: called after each decoder layer.
    """
    import onnx
    from onnx import TensorProto, helper

    H, L, NH, KVH, D, V, eps, theta, P = llm_dims(llm, precision, max_positions)
    check_llm_head_dim(D)

    out_path = Path(out_path)
    np_dtype = np.float16 if precision == "fp16" else np.float32
    onnx_t = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT
    if quant is not None and precision != "fp32":
        raise ExportError(f"quantized llm.onnx is built from fp32 weights, not {precision}")
    external = llm_param_bytes(llm, precision, quant) > EXTERNAL_DATA_THRESHOLD
    data_path = out_path.with_name(out_path.name + ".data") if external else None
    w = _Weights(np_dtype, data_path)
    b = _Builder()
    sd = weights if weights is not None else {k: v for k, v in llm.state_dict().items()}

    def weight_matmul(x: str, name: str, w_kn: np.ndarray, node: str, bits: int | None) -> str:
        """x @ w_kn ([in, out]) as a MatMul, or a MatMulNBits of ``bits`` when the graph is quantized."""
        if not bits:
            return b.op("MatMul", [x, w.add(name, w_kn)], name=node)
        from .quantize import quantize_weight

        attrs, arrays = quantize_weight(w_kn, name, bits=bits, block_size=quant.block_size,
                                        symmetric=quant.symmetric, accuracy_level=quant.accuracy_level)  # fmt: skip
        inputs = [w.add(n, a, keep_dtype=True) for n, a in arrays]
        return b.op("MatMulNBits", [x, *inputs], domain="com.microsoft", name=node, **attrs)

    body_bits = quant.bits if quant is not None else None
    head_bits = (quant.lm_head_bits if quant.lm_head_quantized else None) if quant is not None else None

    def matmul(x: str, prefix: str) -> str:
        # transformers Linear weight is [out, in]; MatMul wants [in, out].
        y = weight_matmul(x, prefix + ".weight", _np(sd[prefix + ".weight"]).T, prefix, body_bits)
        if sd.get(prefix + ".bias") is not None:
            y = b.op("Add", [y, w.add(prefix + ".bias", _np(sd[prefix + ".bias"]))], name=prefix + ".bias")
        return y

    cos, sin = rotary_tables(D, theta, P)
    cos_name = w.add("cos_cache", cos)
    sin_name = w.add("sin_cache", sin)
    minus_one = w.add("last_position", np.array(-1, dtype=np.int64), keep_dtype=True)

    names = LlmGraph(file=out_path.name, inputs=(), outputs=())  # the tensor names (defaults of the format)
    info = dataclasses.replace(
        names,
        inputs=(
            names.inputs_embeds,
            names.past_key,
            names.past_value,
            names.seqlens_k,
            names.total_sequence_length,
        ),
        outputs=(names.logits, names.hidden, names.present_key, names.present_value),
        precision=precision if quant is None else f"int{quant.bits}",
        quant=quant,
        exporter="hand-built",
        kind=LLM_GRAPH_KIND,
        kv_dtype="float16" if precision == "fp16" else "float32",
        external_data=data_path.name if data_path else None,
    )
    graph_inputs = [helper.make_tensor_value_info(info.inputs_embeds, TensorProto.FLOAT, ["batch", "seq", H])]
    graph_outputs = [
        helper.make_tensor_value_info(info.logits, TensorProto.FLOAT, ["batch", V]),
        helper.make_tensor_value_info(info.hidden, TensorProto.FLOAT, ["batch", H]),
    ]
    x = info.inputs_embeds
    if precision == "fp16":
        x = b.op("Cast", [x], to=TensorProto.FLOAT16, name="embeds_to_fp16")

    residual = x
    normed = b.op(
        "SimplifiedLayerNormalization",
        [x, w.add("model.layers.0.input_layernorm.weight", _np(sd["model.layers.0.input_layernorm.weight"]))],
        axis=-1,
        epsilon=eps,
        stash_type=1,
        name="layers.0.input_layernorm",
    )
    for i in range(L):
        p = f"model.layers.{i}"
        attn = p + ".self_attn"
        # One packed QKV MatMul: GQA takes [B, S, (NH + 2 KVH) * D] as its query input.
        qkv_w = np.concatenate([_np(sd[f"{attn}.{n}_proj.weight"]) for n in "qkv"], axis=0).T
        qkv = weight_matmul(normed, f"{attn}.qkv_proj.weight", qkv_w, f"{attn}.qkv_proj", body_bits)
        if sd.get(f"{attn}.q_proj.bias") is not None:
            qkv_b = np.concatenate([_np(sd[f"{attn}.{n}_proj.bias"]) for n in "qkv"])
            qkv = b.op("Add", [qkv, w.add(f"{attn}.qkv_proj.bias", qkv_b)], name=f"{attn}.qkv_bias")
        past_k, past_v = info.past_key.format(i=i), info.past_value.format(i=i)
        pres_k, pres_v = info.present_key.format(i=i), info.present_value.format(i=i)
        cache_shape = ["batch", KVH, "max_len", D]
        graph_inputs += [helper.make_tensor_value_info(n, onnx_t, cache_shape) for n in (past_k, past_v)]
        graph_outputs += [helper.make_tensor_value_info(n, onnx_t, cache_shape) for n in (pres_k, pres_v)]
        b.count += 1
        attn_out = f"{attn}/gqa_out"
        b.nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [qkv, "", "", past_k, past_v, info.seqlens_k, info.total_sequence_length, cos_name, sin_name],
                [attn_out, pres_k, pres_v],
                name=f"{attn}.gqa",
                domain="com.microsoft",
                num_heads=NH,
                kv_num_heads=KVH,
                do_rotary=1,
                rotary_interleaved=0,
                scale=1.0 / math.sqrt(D),
            )
        )
        o = matmul(attn_out, f"{attn}.o_proj")
        # residual + attention, then post_attention_layernorm, in one fused op
        normed, _, _, residual = b.op(
            "SkipSimplifiedLayerNormalization",
            [
                o,
                residual,
                w.add(
                    f"{p}.post_attention_layernorm.weight", _np(sd[f"{p}.post_attention_layernorm.weight"])
                ),
            ],
            n_out=4,
            domain="com.microsoft",
            epsilon=eps,
            name=f"{p}.post_attention_layernorm",
        )
        mlp = p + ".mlp"
        gate = matmul(normed, f"{mlp}.gate_proj")
        up = matmul(normed, f"{mlp}.up_proj")
        act = b.op("Mul", [gate, b.op("Sigmoid", [gate], name=f"{mlp}.sigmoid")], name=f"{mlp}.silu")
        down = matmul(b.op("Mul", [act, up], name=f"{mlp}.gated"), f"{mlp}.down_proj")
        next_norm = f"model.layers.{i + 1}.input_layernorm" if i + 1 < L else "model.norm"
        normed, _, _, residual = b.op(
            "SkipSimplifiedLayerNormalization",
            [down, residual, w.add(next_norm + ".weight", _np(sd[next_norm + ".weight"]))],
            n_out=4,
            domain="com.microsoft",
            epsilon=eps,
            name=next_norm,
        )
        if progress is not None:
            progress(i + 1, L)
    # normed is now model.norm(h) for every position: keep the last one only.
    last = b.op("Gather", [normed, minus_one], axis=1, name="last_position")  # [B, H]
    logits = weight_matmul(
        last, "lm_head.weight", _np(sd["lm_head.weight"]).T, "lm_head", head_bits
    )  # [B, V]
    if sd.get("lm_head.bias") is not None:
        logits = b.op("Add", [logits, w.add("lm_head.bias", _np(sd["lm_head.bias"]))], name="lm_head.bias")
    to = {"to": TensorProto.FLOAT} if precision == "fp16" else None
    b.nodes.append(helper.make_node("Cast" if to else "Identity", [logits], [info.logits], **(to or {})))
    b.nodes.append(helper.make_node("Cast" if to else "Identity", [last], [info.hidden], **(to or {})))
    graph_inputs += [
        helper.make_tensor_value_info(info.seqlens_k, TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info(info.total_sequence_length, TensorProto.INT32, []),
    ]
    w.close()
    graph = helper.make_graph(b.nodes, "legion_llm", graph_inputs, graph_outputs, initializer=w.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        producer_name="legion_rt.export",
    )
    model.ir_version = 8
    onnx.save_model(model, str(out_path))
    return info
