"""Weight-only INT8 / INT4 quantization of llm.onnx with ONNX Runtime's own tool, and its verification.

    quantize_llm(out_dir / "llm.onnx", info, "int4") -> (LlmGraph with precision/quant, QuantCheck)

The LLM's MatMul nodes with constant weights (packed QKV, o_proj, gate/up/down, and lm_head unless excluded)
become ``com.microsoft.MatMulNBits`` (``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer``):
weights stored as ``bits``-bit integers in blocks of ``block_size`` along the input dimension, one fp32 scale (and
a zero point when not symmetric) per block; activations, norms, attention and the KV cache stay float32. ONNX
Runtime has CPU kernels for 4 and 8 bits and a CUDA kernel.

Defaults (``QUANT_DEFAULTS``), chosen by measurement (2026-11-29, make_tiny tiny and small, seeds 0-1, loop
and free; decode speed on the ``medium`` size; numbers in benchmarks/README.md):

* block_size 32 (MatMulNBits takes powers of 2 from 16): int4 weight error rms 0.087 of the weights' rms, fewer
  greedy flips than block 128 (13 vs 15 over 4 x 33 teacher-forced steps, small) for +15 % llm.onnx bytes (the
  fp32 scales: 5 instead of 4.25 bits per weight; still 0.16x fp32 on the medium size).
* symmetric (no zero points): asymmetric measured no better on these weights (flips 15-19 vs 13 at block 32,
  int4 small) and costs the zero-point bytes.
* lm_head quantized to 8 bits, whatever ``bits``: int4 on lm_head doubled the greedy flips (30 vs 13, small; 43 vs
  11, tiny) while int8 on it measured as fp32 (13 vs 13) at 1/4 of its bytes (the 7B's lm_head: 131M weights).
* accuracy_level 4 (int8 activations per block, MLAS's fast path) on the CPU: with 0 (fp32 compute) int8
  decodes 8.5x SLOWER than fp32 (1093 vs 128 ms/token, medium) and int4 reaches 2.06x; with 4, int8 2.16x and
  int4 3.13x faster than fp32. The cost is accuracy: the centered logits move a further 1-6 % (COMPUTE_REL_RMS).
  (An option of the CPU kernel; not measured on a GPU.)

Verification (rule ``quant_dequant``; state and limits below), on the CPU provider, a prefill of random embedding
rows then 16 steps of the fp32 source's greedy tokens fed to every graph (teacher forcing):

* the quantized graph (its fp32-compute twin when accuracy_level is 4: same weights, accuracy_level 0) against the
  same graph with its weights dequantized to float32: max|q - deq| <= 1e-6 + 1e-3 x rms(deq) for logits and
  hidden, and identical greedy argmax but at near-ties within that limit: the kernel computes its own weights;
* every dequantized weight matrix within ``WEIGHT_REL_RMS`` of its fp32 source: the quantizer did not lose them;
* accuracy_level 4: its outputs within ``COMPUTE_REL_RMS`` of the fp32-compute twin;
* recorded, not judged: what quantization changed against the fp32 source (``vs_fp32_source``: centered logits'
  relative rms error, the smallest hidden-state cosine, greedy agreement, the fp32 top-2 margin). On random
  weights it measures the model's sensitivity more than the method (benchmarks/precision.py).
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from legion_rt.manifest import PRECISION_BITS, LlmGraph, Quantization

from .graphs import save_onnx
from .onnx_llm import ExportError
from .verify import Tolerance  # max |got - ref| <= atol + rtol * rms(ref), the export's one tolerance type

QUANTIZED_PRECISIONS = tuple(PRECISION_BITS)  # ("int8", "int4")
QUANT_DEFAULTS = {
    "int8": {"block_size": 32, "symmetric": True, "lm_head_bits": 8, "accuracy_level": 4},
    "int4": {"block_size": 32, "symmetric": True, "lm_head_bits": 8, "accuracy_level": 4},
}
# Weights: rms(dequantized - fp32) / rms(fp32) per matrix must stay below what round-to-nearest on blocks of 32
# gives: for Gaussian-like weights the block absmax is ~2.2 sigma, so the step is 2 x 2.2 sigma / (2^bits - 1)
# and the rms error step / sqrt(12): ~0.085 (int4), ~0.005 (int8). Measured worst matrix (block 32, symmetric,
# tiny and small, loop and free, 2026-11-29): int4 0.0872, int8 0.0054. Limits ~2.2x, room for the heavier tails
# of trained weights (a 3-sigma block absmax gives 0.115 in int4); they catch a packing or transposition error, a
# zero point off by one step, or scales off by more than ~20 % (int4) / ~10 % (int8), not small scale errors.
WEIGHT_REL_RMS = {4: 0.2, 8: 0.012}
# accuracy_level 4 (int8 activations per block, the CPU's fast MatMulNBits path) against its fp32-compute twin:
# rms of the centered logits' and the hidden state's difference / rms of the twin's. Measured (int8 and int4,
# tiny free/loop seed 0, small free seeds 0-1 and loop seed 0, 2026-11-29): logits 0.011-0.064, hidden
# 0.030-0.193. Limit 0.5 (2.6x the worst): it catches a compute path that has lost the signal, not a small drift.
COMPUTE_REL_RMS = 0.5
# Rule "quant_dequant": the quantized graph against the same graph with its weights dequantized to float32 (what
# MatMulNBits must compute). Measured max|q - dequantized| / rms(dequantized), worst over logits and hidden, block
# 32, symmetric and not, int4 and int8, tiny and small, free and loop (2026-11-29): 4.4e-6 .. 7.6e-6 (tiny),
# 3.3e-5 .. 6.6e-5 (small): the float32 rounding of a differently ordered sum, as fp32 ORT vs PyTorch (7.6e-5 on
# small). rtol 1e-3 (the fp32 LLM rule's, which a 32-layer 7B gets): >= 15x the worst seen. A wrong scale, zero
# point or packing changes the output by the quantization step itself (1e-2 .. 1 relative).
QUANT_TOLERANCE = Tolerance(atol=1e-6, rtol=1e-3)


def _quiet() -> None:
    """The quantizer logs every node at INFO level."""
    import logging

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)


def lm_head_node(proto) -> str | None:
    """Name of the MatMul that computes the logits (export/onnx_llm.py names it lm_head_<n>)."""
    for node in proto.graph.node:
        if node.op_type == "MatMul" and node.name.startswith("lm_head"):
            return node.name
    return None


def check_matmul_nbits(bits: int | str) -> None:
    """ExportError (one line) unless this ONNX Runtime quantizes AND runs a ``bits``-bit MatMulNBits on the CPU
    provider (the export verifies there): a one-MatMul graph through the same tool, run and compared.
    ``bits``: 4 / 8 or "int4" / "int8"."""
    bits = PRECISION_BITS[bits] if isinstance(bits, str) else int(bits)
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    version = ort.__version__
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        _quiet()
    except Exception as err:  # noqa: BLE001 - any import failure means the tool is missing
        raise ExportError(
            f"onnxruntime {version} has no MatMulNBitsQuantizer ({type(err).__name__}); "
            f"--precision int{bits} needs onnxruntime >= 1.20"
        ) from None
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="probe")],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    try:
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=32, is_symmetric=True)
        q.process()
        proto = q.model.model
        if not any(n.op_type == "MatMulNBits" for n in proto.graph.node):
            raise RuntimeError("the tool left the MatMul unquantized")
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        (y,) = sess.run(None, {"x": x})
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types
        msg = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ExportError(
            f"onnxruntime {version} cannot quantize or run a {bits}-bit MatMulNBits on the CPU provider ({msg}); "
            f"--precision int{bits} needs a newer onnxruntime"
        ) from None
    err = float(np.abs(y - x @ w).max() / np.abs(x @ w).max())
    if not err < (0.02 if bits == 8 else 0.3):
        raise ExportError(
            f"onnxruntime {version}: its {bits}-bit MatMulNBits gives a relative error of {err:.3g} on a probe "
            f"matrix; --precision int{bits} refused"
        )
    _ = onnx  # the probe is built with onnx helpers


def quantization_record(precision: str) -> Quantization:
    """The manifest's ``graphs.llm.quant`` for ``precision`` with the defaults above."""
    d = QUANT_DEFAULTS[precision]
    return Quantization(
        bits=PRECISION_BITS[precision],
        block_size=d["block_size"],
        symmetric=d["symmetric"],
        lm_head_quantized=bool(d["lm_head_bits"]),
        lm_head_bits=int(d["lm_head_bits"]) or None,
        accuracy_level=int(d["accuracy_level"]),
    )


def quantize_weight(w: np.ndarray, name: str, *, bits: int, block_size: int, symmetric: bool,
                    accuracy_level: int = 0) -> tuple[dict, list[tuple[str, np.ndarray]]]:  # fmt: skip
    """One MatMul weight ``w`` [K, N] (float32, named ``name``) quantized by ``MatMulNBitsQuantizer`` on a graph of
    that one MatMul: returns the MatMulNBits attributes and its weight inputs [(initializer name, array)] (packed
    weights, scales[, zero points]), what the tool writes for the same MatMul inside a whole graph (the tool treats
    each MatMul on its own). The streamed export (a 7B whose float32 graph would not fit) quantizes this way,
    one weight at a time."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    _quiet()
    K, N = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", name], ["y"], name="mm")],
        "one_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
        initializer=[numpy_helper.from_array(np.ascontiguousarray(w, dtype=np.float32), name)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                             accuracy_level=accuracy_level or None)  # fmt: skip
    q.process()
    proto = q.model.model
    (node,) = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    inits = {t.name: t for t in proto.graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    arrays = [(i, numpy_helper.to_array(inits[i])) for i in node.input[1:] if i]
    _ = onnx
    return attrs, arrays


def quantize_file(
    src: Path,
    dst: Path,
    *,
    bits: int,
    block_size: int,
    symmetric: bool,
    lm_head_bits: int,
    accuracy_level: int = 0,
) -> Quantization:
    """Quantize the MatMul weights of ``src`` (an fp32 llm.onnx) into ``dst`` (external data ``dst.data`` when
    it would pass 2 GB). ``lm_head_bits``: 0 keeps the output projection fp32, else its bits (two passes of the
    tool when it differs from ``bits``). Returns the manifest record."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    _quiet()
    proto = onnx.load(str(src), load_external_data=True)
    head = lm_head_node(proto)
    if head is None:
        lm_head_bits = 0
    passes = [(bits, [head] if (head is not None and lm_head_bits != bits) else [], None)]
    if lm_head_bits and lm_head_bits != bits:
        passes.append((lm_head_bits, [], [head]))
    for b, exclude, include in passes:
        q = MatMulNBitsQuantizer(
            proto,
            bits=b,
            block_size=block_size,
            is_symmetric=symmetric,
            accuracy_level=accuracy_level or None,
            nodes_to_exclude=exclude,
            nodes_to_include=include,
        )
        q.process()
        proto = q.model.model
    left = [n.name for n in proto.graph.node if n.op_type == "MatMul" and (n.name != head or lm_head_bits)]
    if left:
        raise ExportError(f"MatMulNBitsQuantizer left MatMul nodes unquantized: {left[:3]}")
    data = dst.with_name(dst.name + ".data")
    if data.exists():
        data.unlink()
    save_onnx(proto, dst)
    return Quantization(
        bits=bits,
        block_size=block_size,
        symmetric=symmetric,
        lm_head_quantized=bool(lm_head_bits),
        lm_head_bits=int(lm_head_bits) or None,
        accuracy_level=int(accuracy_level or 0),
    )


# ------------------------------------------------------------------------------------------------ verification
def _session(path: Path, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_llm(path: Path, model_info, info: LlmGraph, embeds: np.ndarray, feed: list | None, steps: int,
            table: np.ndarray, threads: int = 0):  # fmt: skip
    """Prefill ``embeds`` [1,P,H], then ``steps`` steps. ``feed``: the token ids to feed (teacher forcing), or
    None for greedy on this graph. Returns (logits [steps+1, V], hidden [steps+1, H], fed ids)."""
    from legion_rt.backends.ort_llm import OrtLLM

    runner = OrtLLM(_session(path, threads), model_info, info)
    cache = runner.new_cache(embeds.shape[1] + steps)
    logits, hidden, ids = [], [], []
    x = embeds
    for k in range(steps + 1):
        lg, hd = runner.forward(cache, x)
        logits.append(np.asarray(lg, np.float32).reshape(-1))
        hidden.append(np.asarray(hd, np.float32).reshape(-1))
        if k == steps:
            break
        nxt = int(feed[k]) if feed is not None else int(np.argmax(logits[-1]))
        ids.append(nxt)
        x = table[nxt][None, None].astype(np.float32)
    return np.stack(logits), np.stack(hidden), ids


def dequantized_graph(q_path: Path, dst: Path, weights: dict | None = None) -> int:
    """Write ``dst``: ``q_path`` with every MatMulNBits replaced by a float32 MatMul over its dequantized weights
    ((q - zero_point) * scale per block; zero point 2^(bits-1) when symmetric). The quantized graph must compute
    exactly this graph's function, up to float32 rounding. Returns the number of nodes replaced."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(q_path), load_external_data=True)
    inits = {t.name: t for t in proto.graph.initializer}
    nodes, new_inits, drop, count = [], [], set(), 0
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        K, N, bits, bs = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
        nb = -(-K // bs)
        packed = numpy_helper.to_array(inits[node.input[1]]).reshape(N, nb, -1)
        scales = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(N, nb)
        if bits == 4:
            q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(N, nb, -1)[:, :, :bs]
        elif bits == 8:
            q = packed[:, :, :bs]
        else:
            raise ExportError(f"{node.name}: MatMulNBits with {bits} bits is not handled here")
        zp = np.full((N, nb), 2 ** (bits - 1), np.float32)
        if len(node.input) > 3 and node.input[3]:
            z = numpy_helper.to_array(inits[node.input[3]]).reshape(N, -1)
            if z.dtype != np.uint8:
                raise ExportError(f"{node.name}: float zero points are not handled here")
            if bits == 4:
                z = np.stack([z & 0x0F, z >> 4], axis=-1).reshape(N, -1)
            zp = z[:, :nb].astype(np.float32)
        w = ((q.astype(np.float32) - zp[:, :, None]) * scales[:, :, None]).reshape(N, nb * bs)[:, :K]
        name = node.name + ".dequantized"
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), name))
        if weights is not None:
            weights[node.name] = (w.T, bits)
        drop.update(i for i in node.input[1:] if i)
        out = node.output[0]
        if len(node.input) > 5 and node.input[5]:
            mid = out + ".nobias"
            nodes.append(helper.make_node("MatMul", [node.input[0], name], [mid], name=node.name))
            nodes.append(helper.make_node("Add", [mid, node.input[5]], [out], name=node.name + ".bias"))
            drop.discard(node.input[5])
        else:
            nodes.append(helper.make_node("MatMul", [node.input[0], name], [out], name=node.name))
        count += 1
    keep = [t for t in proto.graph.initializer if t.name not in drop]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep + new_inits)
    save_onnx(proto, dst)
    return count


def with_accuracy_level(src: Path, dst: Path, level: int) -> None:
    """``src`` with every MatMulNBits' accuracy_level set to ``level`` (same weights)."""
    import onnx
    from onnx import helper

    proto = onnx.load(str(src), load_external_data=True)
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            keep = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(keep + [helper.make_attribute("accuracy_level", int(level))])
    save_onnx(proto, dst)


def weight_errors(fp32_path: Path, deq: dict) -> dict:
    """Per quantized matrix: rms(dequantized - fp32 source) / rms(fp32 source), and its bits. The quantizer names
    a MatMul ``<name>`` of the source ``<name>_Q<bits>``."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(fp32_path), load_external_data=True)
    inits = {t.name: t for t in proto.graph.initializer}
    src = {n.name: n.input[1] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    out = {}
    for name, (w, bits) in deq.items():
        base = name.rsplit("_Q", 1)[0]
        if base not in src:
            raise ExportError(f"{name}: no MatMul {base} in the fp32 source graph")
        ref = numpy_helper.to_array(inits[src[base]]).astype(np.float64)
        if ref.shape != w.shape:
            raise ExportError(f"{name}: dequantized weight {w.shape} != fp32 source {ref.shape}")
        out[base] = (_rel_rms(w, ref), bits)
    return out


def _centered(x: np.ndarray) -> np.ndarray:
    """Logits minus their mean per step (softmax and argmax ignore a common offset; random-weight models have
    offsets of 1e4 that would hide every difference in a relative error)."""
    x = x.astype(np.float64)
    return x - x.mean(axis=-1, keepdims=True)


def _rel_rms(a: np.ndarray, ref: np.ndarray) -> float:
    a, ref = a.astype(np.float64), ref.astype(np.float64)
    return float(np.sqrt(np.mean((a - ref) ** 2)) / max(np.sqrt(np.mean(ref**2)), 1e-30))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest per-row cosine similarity."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
    return float(cos.min())


def compare_to_source(got_l, got_h, ref_l, ref_h) -> dict:
    """What quantization changed against the fp32 source (recorded, not judged: on random weights it measures
    the model's sensitivity more than the method; benchmarks/precision.py reports it per model)."""
    margins = np.sort(ref_l, axis=-1)[:, -2:]
    same = np.argmax(got_l, -1) == np.argmax(ref_l, -1)
    return {
        "logits_rel_rms_centered": _rel_rms(_centered(got_l), _centered(ref_l)),
        "hidden_min_cosine": _cosine(got_h, ref_h),
        "greedy_identical": f"{int(same.sum())}/{len(same)}",
        "fp32_top2_margin_median": float(np.median(margins[:, 1] - margins[:, 0])),
    }


@dataclass
class QuantCheck:
    """Verdict for the quantized llm.onnx (same interface as onnx_export's per-graph check)."""

    name: str
    rule: str
    max_abs: float  # max |q - dequantized fp32| of the worst output
    limit: float
    output: str
    ref_max: float
    ref_rms: float
    argmax: str
    argmax_ok: bool
    note: str = ""
    source: dict = dataclasses.field(default_factory=dict)  # compare_to_source
    weights: dict = dataclasses.field(default_factory=dict)  # dequantized weights vs the fp32 source's
    compute: dict = dataclasses.field(default_factory=dict)  # accuracy_level 4 vs its fp32-compute twin

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs)) and self.max_abs <= self.limit and self.argmax_ok

    @property
    def torch_err(self):  # the fp64 rule's field; not this rule's
        return None

    def to_json(self) -> dict:
        out = {"rule": self.rule, "max_abs_err": self.max_abs, "limit": self.limit, "output": self.output,
               "ref_max": self.ref_max, "ref_rms": self.ref_rms, "greedy_argmax": self.argmax,
               "reference": "llm.onnx with the dequantized weights in float32",
               "vs_fp32_source": self.source, "weights": self.weights, "compute": self.compute}  # fmt: skip
        if self.note:
            out["note"] = self.note
        return out

    def line(self) -> str:
        src = ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.source.items()
        )
        return (f"{self.name:<12} {self.rule} max abs err {self.max_abs:.3g} (limit {self.limit:.3g}; |ref| max "
                f"{self.ref_max:.3g}, rms {self.ref_rms:.3g}) [{self.output}]; greedy: {self.argmax}; "
                f"vs fp32 source: {src}")  # fmt: skip


def verify_quantized(q_path: Path, fp32_path: Path, model_info, fp32_info: LlmGraph, q_info: LlmGraph,
                     table: np.ndarray, *, seed: int = 0, prompt: int = 24, steps: int = 16,
                     scale: float = 1.0) -> QuantCheck:  # fmt: skip
    """Judge ``q_path`` (rule ``quant_dequant``, see the module docstring) and measure it against ``fp32_path``."""
    rng = np.random.default_rng(seed)
    embeds = table[rng.integers(0, table.shape[0], prompt)][None].astype(np.float32)
    ref_l, ref_h, ids = run_llm(fp32_path, model_info, fp32_info, embeds, None, steps, table)
    deq_path = fp32_path.with_name("llm.dequantized.onnx")
    deq_weights: dict = {}
    dequantized_graph(q_path, deq_path, deq_weights)
    weight_err = weight_errors(fp32_path, deq_weights)
    weight_bad = [
        f"{k} {e:.3g} > {WEIGHT_REL_RMS[b]}" for k, (e, b) in weight_err.items() if not e <= WEIGHT_REL_RMS[b]
    ]
    # both fed the fp32 source's greedy tokens (teacher forcing): every step is judged on the same inputs
    deq_l, deq_h, _ = run_llm(deq_path, model_info, fp32_info, embeds, ids, steps, table)
    level = q_info.quant.accuracy_level
    exact_path = q_path
    if level:  # int8 compute: its fp32-compute twin (same weights, accuracy_level 0) is judged exactly
        exact_path = fp32_path.with_name("llm.accuracy0.onnx")
        with_accuracy_level(q_path, exact_path, 0)
    got_l, got_h, _ = run_llm(exact_path, model_info, q_info, embeds, ids, steps, table)
    compute, compute_bad = {}, []
    if level:
        c_l, c_h, _ = run_llm(q_path, model_info, q_info, embeds, ids, steps, table)
        compute = {"logits": _rel_rms(_centered(c_l), _centered(got_l)), "hidden": _rel_rms(c_h, got_h)}
        lim4 = COMPUTE_REL_RMS * scale
        compute_bad = [f"{k} {v:.3g} > {lim4:.3g}" for k, v in compute.items() if not v <= lim4]
    else:
        c_l, c_h = got_l, got_h
    tol = QUANT_TOLERANCE.scaled(scale)
    worst, ratio = None, -1.0
    for name, got, ref in (("logits", got_l, deq_l), ("hidden", got_h, deq_h)):
        err = float(np.abs(got.astype(np.float64) - ref).max())
        rms = float(np.sqrt(np.mean(ref.astype(np.float64) ** 2)))
        lim = tol.limit(rms)
        if err / lim > ratio:
            ratio, worst = err / lim, (name, err, lim, float(np.abs(ref).max()), rms)
    name, err, lim, ref_max, ref_rms = worst
    logit_lim = tol.limit(float(np.sqrt(np.mean(deq_l.astype(np.float64) ** 2))))
    flips, bad = 0, 0
    for k in range(steps + 1):  # a flip is accepted only at a tie within the logits' limit (as the fp32 rule)
        a, b = int(np.argmax(got_l[k])), int(np.argmax(deq_l[k]))
        if a != b:
            flips += 1
            bad += float(deq_l[k, b] - deq_l[k, a]) > logit_lim
    argmax = f"{steps + 1 - flips}/{steps + 1} identical" + (
        f", {flips - bad} near-tie(s)" if flips - bad else ""
    )
    if weight_bad:
        argmax += f"; dequantized weights off their fp32 source: {weight_bad[0]}"
    if compute_bad:
        argmax += f"; accuracy_level {level} compute off the fp32-compute twin: {compute_bad[0]}"
    return QuantCheck(
        name="llm",
        rule="quant_dequant",
        max_abs=err if np.isfinite(err) else float("inf"),
        limit=lim,
        output=name,
        ref_max=ref_max,
        ref_rms=ref_rms,
        argmax=argmax,
        argmax_ok=bad == 0 and not weight_bad and not compute_bad,
        note=f"int{q_info.quant.bits}, prefill {prompt} + {steps} steps",
        weights={
            "worst_rel_rms": {
                f"int{b}": max(e for e, bb in weight_err.values() if bb == b)
                for b in sorted({b for _, b in weight_err.values()})
            },
            "limits": {f"int{b}": WEIGHT_REL_RMS[b] for b in sorted({b for _, b in weight_err.values()})},
            "over": weight_bad,
        },  # fmt: skip
        source=compare_to_source(c_l, c_h, ref_l, ref_h),
        compute={"accuracy_level": level, "rel_rms_vs_fp32_compute": compute, "limit": COMPUTE_REL_RMS}
        if level
        else {},
    )


def quantize_llm(
    llm_path: Path,
    info: LlmGraph,
    model_info,
    precision: str,
    *,
    table: np.ndarray | None = None,
    verify: bool = True,
    seed: int = 0,
    scale: float = 1.0,
    block_size: int | None = None,
    symmetric: bool | None = None,
    lm_head_bits: int | None = None,
    accuracy_level: int | None = None,
) -> tuple[LlmGraph, QuantCheck | None]:
    """Replace the fp32 ``llm_path`` by its ``precision`` (int8/int4) quantization; with ``verify``, judge it
    against the fp32 graph first (``table``: the embedding table, for the check's inputs). Returns the updated
    manifest entry and the check (None without ``verify``). Raises ExportError (one line) when this ONNX Runtime
    lacks the operator or the check fails."""
    if precision not in QUANTIZED_PRECISIONS:
        raise ExportError(f"precision {precision!r}: expected one of {', '.join(QUANTIZED_PRECISIONS)}")
    if info.precision != "fp32":
        raise ExportError(f"quantization starts from an fp32 llm.onnx, got {info.precision}")
    bits = PRECISION_BITS[precision]
    check_matmul_nbits(bits)
    d = QUANT_DEFAULTS[precision]
    llm_path = Path(llm_path)
    # The fp32 source moves into a side directory with its external data (the graph names that file), where the
    # check reads it; the directory is removed before the manifest lists the files.
    side = llm_path.parent / ".fp32-source"
    side.mkdir(exist_ok=True)
    src = side / llm_path.name
    shutil.move(llm_path, src)
    data = llm_path.with_name(llm_path.name + ".data")
    if data.exists():
        shutil.move(data, side / data.name)
    try:
        quant = quantize_file(
            src,
            llm_path,
            bits=bits,
            block_size=block_size or d["block_size"],
            symmetric=d["symmetric"] if symmetric is None else symmetric,
            lm_head_bits=d["lm_head_bits"] if lm_head_bits is None else lm_head_bits,
            accuracy_level=d["accuracy_level"] if accuracy_level is None else accuracy_level,
        )
        new = dataclasses.replace(
            info, precision=precision, quant=quant, external_data=data.name if data.exists() else None
        )
        check = None
        if verify:
            if table is None:
                raise ExportError("verifying a quantized llm.onnx needs the embedding table")
            check = verify_quantized(llm_path, src, model_info, info, new, table, seed=seed, scale=scale)
    finally:
        shutil.rmtree(side, ignore_errors=True)
    return new, check
