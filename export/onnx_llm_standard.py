"""The LLM graph of kind ``"standard_kv"``: standard ONNX operators only (opset 17), for TensorRT's ONNX parser.

The ``"gqa_shared_kv"`` graph (export/onnx_llm.py) uses ONNX Runtime's contrib ops GroupQueryAttention,
SimplifiedLayerNormalization and SkipSimplifiedLayerNormalization, which TensorRT 10.x / 11 do not parse. This
graph writes the same model out with MatMul / Softmax / Concat / Range / Where ...: RMSNorm as
ReduceMean + Sqrt + Div, rotary embeddings as two multiplies with precomputed [MAX, D] tables, grouped-query
attention as a 5-D MatMul that broadcasts each KV head over its query heads (no copy of K/V), a causal mask built
from the positions, and the KV cache as past inputs concatenated with the new rows into present outputs.

Graph contract (kind ``"standard_kv"``, one graph for prefill and decode, batch 1 at a time):

inputs
    inputs_embeds              f32 [B, S, H]            embeddings of the S new positions
    past_key_values.{i}.key     T  [B, KVH, P, D]       the P filled positions (P may be 0)
    past_key_values.{i}.value   T  [B, KVH, P, D]
outputs
    logits                     f32 [B, V]               logits of the last position
    hidden                     f32 [B, H]               final-norm hidden state of the last position
    present.{i}.key/value       T  [B, KVH, P + S, D]   past followed by the S new rows

The positions of the new rows are P .. P + S - 1 (P read from the past's shape), so the graph needs no position
or length input. T is float32 (fp32) or float16 (fp16; the RMSNorms, the softmax and the mask add run in fp32
inside the graph, as transformers' LlamaRMSNorm and eager attention do: these are the numerically sensitive
layers; inputs and outputs stay f32).

Cost: each call copies the cache into ``present`` (Concat); the GQA graph appends in place instead. On the CPU the
GQA graph stays the default; this one exists for TensorRT (optimization profiles over S and P).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np

from legion_rt.manifest import LlmGraph

from .onnx_llm import (
    EXTERNAL_DATA_THRESHOLD,
    ExportError,
    _Builder,
    _np,
    _Weights,
    llm_dims,
    llm_param_bytes,
    rotary_tables,
)

STANDARD_KIND = "standard_kv"
STANDARD_OPSET = 17  # TensorRT 10.3 parses opsets 9..20 (its ONNX parser's supported-ops list); 17 is enough


def build_standard_llm_graph(
    llm,
    out_path: str | os.PathLike,
    *,
    precision: str = "fp32",
    max_positions: int | None = None,
    weights=None,
) -> LlmGraph:
    """Write a ``standard_kv`` llm graph to ``out_path`` (+ ``.data`` when the weights pass 2 GB); returns its
    ``graphs.llm`` manifest entry. Same model, same tensor names for embeds / logits / hidden / past / present
    as the GQA graph; no ``seqlens_k`` / ``total_sequence_length`` inputs."""
    import onnx
    from onnx import TensorProto, helper

    H, L, NH, KVH, D, V, eps, theta, P = llm_dims(llm, precision, max_positions)
    if NH % KVH:
        raise ExportError(f"num_key_value_heads {KVH} does not divide num_attention_heads {NH}")
    rep = NH // KVH

    out_path = Path(out_path)
    fp16 = precision == "fp16"
    np_dtype = np.float16 if fp16 else np.float32
    onnx_t = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    external = llm_param_bytes(llm, precision) > EXTERNAL_DATA_THRESHOLD
    data_path = out_path.with_name(out_path.name + ".data") if external else None
    w = _Weights(np_dtype, data_path)
    b = _Builder()
    sd = (
        weights if weights is not None else dict(llm.state_dict())
    )  # StreamedLlmWeights: one tensor at a time

    def i64(name: str, values) -> str:
        return w.add(name, np.array(values, dtype=np.int64), keep_dtype=True)

    def f32(name: str, values) -> str:
        return w.add(name, np.array(values, dtype=np.float32), keep_dtype=True)

    def linear(x: str, prefix: str) -> str:
        y = b.op("MatMul", [x, w.add(prefix + ".weight", _np(sd[prefix + ".weight"]).T)], name=prefix)
        if sd.get(prefix + ".bias") is not None:
            y = b.op("Add", [y, w.add(prefix + ".bias", _np(sd[prefix + ".bias"]))], name=prefix + ".bias")
        return y

    eps_c = f32("rms_eps", eps)
    axes_last = i64("axes_last", [-1])

    def rms_norm(x: str, weight_key: str) -> str:
        # transformers' LlamaRMSNorm: float32 x * rsqrt(mean(x^2) + eps), back to the input dtype, times weight.
        xf = b.op("Cast", [x], to=TensorProto.FLOAT, name=weight_key + ".to_fp32") if fp16 else x
        var = b.op("ReduceMean", [b.op("Mul", [xf, xf], name=weight_key + ".sq")], axes=[-1], keepdims=1,
                   name=weight_key + ".mean")  # fmt: skip
        rms = b.op("Sqrt", [b.op("Add", [var, eps_c], name=weight_key + ".eps")], name=weight_key + ".sqrt")
        y = b.op("Div", [xf, rms], name=weight_key + ".div")
        if fp16:
            y = b.op("Cast", [y], to=TensorProto.FLOAT16, name=weight_key + ".to_fp16")
        return b.op("Mul", [y, w.add(weight_key, _np(sd[weight_key]))], name=weight_key)

    names = LlmGraph(file=out_path.name, inputs=(), outputs=())
    info = dataclasses.replace(
        names,
        inputs=(names.inputs_embeds, names.past_key, names.past_value),
        outputs=(names.logits, names.hidden, names.present_key, names.present_value),
        precision=precision,
        exporter="hand-built",
        kind=STANDARD_KIND,
        kv_dtype="float16" if fp16 else "float32",
        external_data=data_path.name if data_path else None,
    )
    graph_inputs = [helper.make_tensor_value_info(info.inputs_embeds, TensorProto.FLOAT, ["batch", "seq", H])]
    graph_outputs = [
        helper.make_tensor_value_info(info.logits, TensorProto.FLOAT, ["batch", V]),
        helper.make_tensor_value_info(info.hidden, TensorProto.FLOAT, ["batch", H]),
    ]

    # Positions of the new rows: past_len .. past_len + S - 1 (past_len from layer 0's past key).
    past0 = info.past_key.format(i=0)
    past_len = b.op("Squeeze", [b.op("Shape", [past0], start=2, end=3, name="past_len_1d")], name="past_len")
    seq = b.op("Squeeze", [b.op("Shape", [info.inputs_embeds], start=1, end=2, name="seq_1d")], name="seq")
    total = b.op("Add", [past_len, seq], name="total_len")
    one = i64("one", 1)
    zero = i64("zero", 0)
    positions = b.op("Range", [past_len, total, one], name="positions")  # [S]
    key_positions = b.op("Range", [zero, total, one], name="key_positions")  # [T]
    # rotary: x * cos + rotate_half(x) * sin, with rotate_half(x) * sin = swap_halves(x) * [-sin, sin]
    cos, sin = rotary_tables(D, theta, P)
    cos_full = w.add("cos_full", np.concatenate([cos, cos], axis=-1))  # [MAX, D]
    sin_signed = w.add("sin_signed", np.concatenate([-sin, sin], axis=-1))
    cos_s = b.op("Gather", [cos_full, positions], axis=0, name="cos_at")  # [S, D]
    sin_s = b.op("Gather", [sin_signed, positions], axis=0, name="sin_at")
    half = i64("half_split", [D // 2, D // 2])

    def rotary(x: str, tag: str) -> str:  # x [B, heads, S, D]
        x1, x2 = b.op("Split", [x, half], n_out=2, axis=-1, name=tag + ".split")
        swapped = b.op("Concat", [x2, x1], axis=-1, name=tag + ".swap")
        return b.op("Add", [b.op("Mul", [x, cos_s], name=tag + ".cos"), b.op("Mul", [swapped, sin_s],
                    name=tag + ".sin")], name=tag + ".rope")  # fmt: skip

    # causal mask [S, T]: key t is visible to query at position p when t <= p; float32 (added in fp32)
    hidden_mask = b.op(
        "Greater",
        [b.op("Unsqueeze", [key_positions, i64("axes_0", [0])], name="kpos_row"),
         b.op("Unsqueeze", [positions, axes_last], name="qpos_col")],
        name="mask_cond",
    )  # fmt: skip
    mask = b.op("Where", [hidden_mask, f32("mask_min", np.finfo(np.float32).min), f32("mask_zero", 0.0)],
                name="causal_mask")  # fmt: skip
    scale = w.add("attn_scale", np.array(1.0 / math.sqrt(D), dtype=np.float32))  # in the graph's dtype
    q_shape = i64("q_shape", [0, 0, NH, D])
    kv_shape = i64("kv_shape", [0, 0, KVH, D])
    q_group_shape = i64("q_group_shape", [0, KVH, rep, -1, D])  # [B, NH, S, D] -> [B, KVH, rep, S, D]
    merged_shape = i64("merged_heads", [0, NH, -1, D])
    out_shape = i64("attn_out_shape", [0, 0, NH * D])
    axes_2 = i64("axes_2", [2])

    x = info.inputs_embeds
    if fp16:
        x = b.op("Cast", [x], to=TensorProto.FLOAT16, name="embeds_to_fp16")
    cache_shape_in = ["batch", KVH, "past_len", D]
    cache_shape_out = ["batch", KVH, "total_len", D]
    for i in range(L):
        p = f"model.layers.{i}"
        attn = p + ".self_attn"
        h = rms_norm(x, f"{p}.input_layernorm.weight")
        q = linear(h, f"{attn}.q_proj")
        k = linear(h, f"{attn}.k_proj")
        v = linear(h, f"{attn}.v_proj")
        q = b.op("Transpose", [b.op("Reshape", [q, q_shape], name=f"{attn}.q_heads")], perm=[0, 2, 1, 3],
                 name=f"{attn}.q_t")  # fmt: skip
        k = b.op("Transpose", [b.op("Reshape", [k, kv_shape], name=f"{attn}.k_heads")], perm=[0, 2, 1, 3],
                 name=f"{attn}.k_t")  # fmt: skip
        v = b.op("Transpose", [b.op("Reshape", [v, kv_shape], name=f"{attn}.v_heads")], perm=[0, 2, 1, 3],
                 name=f"{attn}.v_t")  # fmt: skip
        q = rotary(q, f"{attn}.q")
        k = rotary(k, f"{attn}.k")
        past_k, past_v = info.past_key.format(i=i), info.past_value.format(i=i)
        pres_k, pres_v = info.present_key.format(i=i), info.present_value.format(i=i)
        graph_inputs += [helper.make_tensor_value_info(n, onnx_t, cache_shape_in) for n in (past_k, past_v)]
        graph_outputs += [helper.make_tensor_value_info(n, onnx_t, cache_shape_out) for n in (pres_k, pres_v)]
        b.nodes.append(helper.make_node("Concat", [past_k, k], [pres_k], axis=2, name=f"{attn}.present_k"))
        b.nodes.append(helper.make_node("Concat", [past_v, v], [pres_v], axis=2, name=f"{attn}.present_v"))
        # grouped-query attention without repeating K/V: q [B, KVH, rep, S, D] x k [B, KVH, 1, D, T]
        qg = b.op("Reshape", [q, q_group_shape], name=f"{attn}.q_groups")
        kt = b.op("Unsqueeze", [b.op("Transpose", [pres_k], perm=[0, 1, 3, 2], name=f"{attn}.k_T"), axes_2],
                  name=f"{attn}.k_bcast")  # fmt: skip
        vb = b.op("Unsqueeze", [pres_v, axes_2], name=f"{attn}.v_bcast")
        scores = b.op("Mul", [b.op("MatMul", [qg, kt], name=f"{attn}.qk"), scale], name=f"{attn}.scale")
        if fp16:
            scores = b.op("Cast", [scores], to=TensorProto.FLOAT, name=f"{attn}.scores_fp32")
        probs = b.op("Softmax", [b.op("Add", [scores, mask], name=f"{attn}.mask")], axis=-1,
                     name=f"{attn}.softmax")  # fmt: skip
        if fp16:
            probs = b.op("Cast", [probs], to=TensorProto.FLOAT16, name=f"{attn}.probs_fp16")
        ctx = b.op("MatMul", [probs, vb], name=f"{attn}.pv")  # [B, KVH, rep, S, D]
        ctx = b.op("Reshape", [ctx, merged_shape], name=f"{attn}.merge_heads")  # [B, NH, S, D]
        ctx = b.op("Transpose", [ctx], perm=[0, 2, 1, 3], name=f"{attn}.ctx_t")
        ctx = b.op("Reshape", [ctx, out_shape], name=f"{attn}.ctx")
        x = b.op("Add", [x, linear(ctx, f"{attn}.o_proj")], name=f"{p}.attn_residual")
        h = rms_norm(x, f"{p}.post_attention_layernorm.weight")
        mlp = p + ".mlp"
        gate = linear(h, f"{mlp}.gate_proj")
        act = b.op("Mul", [gate, b.op("Sigmoid", [gate], name=f"{mlp}.sigmoid")], name=f"{mlp}.silu")
        down = linear(
            b.op("Mul", [act, linear(h, f"{mlp}.up_proj")], name=f"{mlp}.gated"), f"{mlp}.down_proj"
        )
        x = b.op("Add", [x, down], name=f"{p}.mlp_residual")
    last = b.op("Slice", [x, i64("last_start", [-1]), i64("last_end", [2**62]), i64("axes_1", [1])],
                name="last_position")  # fmt: skip
    last = b.op("Squeeze", [last, i64("squeeze_1", [1])], name="last_squeeze")  # [B, H]
    normed = rms_norm(last, "model.norm.weight")
    logits = linear(normed, "lm_head")
    to = {"to": TensorProto.FLOAT} if fp16 else None
    b.nodes.append(helper.make_node("Cast" if to else "Identity", [logits], [info.logits], **(to or {})))
    b.nodes.append(helper.make_node("Cast" if to else "Identity", [normed], [info.hidden], **(to or {})))
    w.close()
    graph = helper.make_graph(b.nodes, "legion_llm_standard", graph_inputs, graph_outputs,
                              initializer=w.initializers)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", STANDARD_OPSET)],
                              producer_name="legion_rt.export")  # fmt: skip
    model.ir_version = 8
    onnx.save_model(model, str(out_path))
    return info


def standard_only(path: str | os.PathLike) -> list[str]:
    """Operators of ``path`` outside the default ONNX domain (empty for a graph TensorRT's parser can read)."""
    import onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    return sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
