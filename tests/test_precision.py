"""--precision int8 / int4 (export/quantize.py), the manifest's quantization record, the memory plan
(legion_rt/memory_plan.py) against real exported files, and Engine(max_memory=...)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="export-stage tests need torch (pip install .[export])")
ort = pytest.importorskip("onnxruntime", reason="the runtime needs onnxruntime")

from legion_rt.errors import ArtifactError, RequestError  # noqa: E402
from legion_rt.export.onnx_export import export_artifacts  # noqa: E402
from legion_rt.export.onnx_llm import ExportError  # noqa: E402
from legion_rt.manifest import Manifest, Quantization  # noqa: E402
from legion_rt.memory_plan import plan_memory  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "legion_rt" / "assets" / "demo.jpg"


def _export(paths, out, precision, **kw):
    return export_artifacts(checkpoint=paths.checkpoint, clip=paths.clip, detector=paths.detector, out=out,
                            precision=precision, progress=False, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def int4_art(tiny_paths, tmp_path_factory):
    return _export(tiny_paths, tmp_path_factory.mktemp("int4") / "art", "int4")


@pytest.fixture(scope="module")
def int8_art(tiny_paths, tmp_path_factory):
    return _export(tiny_paths, tmp_path_factory.mktemp("int8") / "art", "int8")


def _manifest(art) -> Manifest:
    return Manifest.from_json(json.loads((Path(art) / "manifest.json").read_text()))


def _ops(path) -> dict:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    out = {}
    for n in proto.graph.node:
        bits = next((a.i for a in n.attribute if a.name == "bits"), None)
        out.setdefault(n.op_type, []).append((n.name, bits))
    return out


# ------------------------------------------------------------------------------------------------ the export
@pytest.mark.parametrize("precision,bits", [("int4", 4), pytest.param("int8", 8, marks=pytest.mark.slow)])
def test_quantized_export(precision, bits, request):
    art = request.getfixturevalue(f"{precision}_art")
    m = _manifest(art)
    assert m.precision == precision and m.graphs.llm.precision == precision
    q = m.graphs.llm.quant
    assert q == Quantization(
        bits=bits, block_size=32, symmetric=True, lm_head_quantized=True, lm_head_bits=8, accuracy_level=4
    )
    for name in ("vision", "sam_encoder", "mask_head"):  # kept in fp32 (benchmarks/README.md "Precision")
        assert getattr(m.graphs, name).precision == "fp32"
    assert m.graphs.llm.kv_dtype == "float32"
    assert np.load(art / "embed_tokens.npy").dtype == np.float16
    ops = _ops(art / "llm.onnx")
    assert "MatMul" not in ops  # every linear weight quantized
    nbits = ops["MatMulNBits"]
    assert len(nbits) == 2 * 5 + 1  # per layer: qkv, o_proj, gate, up, down (tiny: 2 layers) + lm_head
    head = [b for name, b in nbits if name.startswith("lm_head")]
    assert head == [8] and {b for name, b in nbits if not name.startswith("lm_head")} == {bits}
    v = m.verification["llm"]
    assert v["rule"] == "quant_dequant" and v["max_abs_err"] <= v["limit"]
    assert "vs_fp32_source" in v and "llm_fp32_source" in m.verification
    assert m.verification["llm_fp32_source"]["rule"] == "fp64_ratio"
    fp32_bytes = (
        923259  # the tiny fp32 llm.onnx (docs/FORMAT.md); the 1 MB rotary tables dominate at this size
    )
    assert m.files["llm.onnx"].bytes < fp32_bytes


def _run_against_fp32(tiny_artifacts, arts: dict):
    import legion_rt

    res = {}
    for name, art in (("fp32", tiny_artifacts), *arts.items()):
        with legion_rt.Engine(art, threads=2) as eng:
            res[name] = eng.analyze(DEMO, max_new_tokens=48)
    assert res["fp32"].artifacts  # the loop model says [SEG]: masks were made
    for name in arts:  # tiny loop before its EOS: wide planted margins (see benchmarks/README.md)
        assert res[name].token_ids == res["fp32"].token_ids
        assert len(res[name].artifacts) == len(res["fp32"].artifacts)
        assert res[name].verdict == res["fp32"].verdict


def test_int4_runs_in_the_runtime(int4_art, tiny_artifacts):
    """int4 end to end (text, [SEG] masks); the loop model's planted text survives quantization."""
    _run_against_fp32(tiny_artifacts, {"int4": int4_art})


@pytest.mark.slow
def test_int8_runs_in_the_runtime(int8_art, tiny_artifacts):
    _run_against_fp32(tiny_artifacts, {"int8": int8_art})


def test_verification_catches_a_wrong_quantization(int4_art, tiny_paths, tmp_path):
    """Scales 1.5x too large: the graph is consistent with its own dequantization, but its weights are off their
    fp32 source beyond the int4 limit: the check fails and says why."""
    import onnx
    from onnx import numpy_helper

    from legion_rt.export.checkpoint import load_legion
    from legion_rt.export.onnx_llm import build_llm_graph, llm_model_info
    from legion_rt.export.quantize import verify_quantized

    model = load_legion(tiny_paths.checkpoint, tiny_paths.clip).float().eval()
    info = build_llm_graph(model.llm, tmp_path / "fp32.onnx")
    table = model.llm.get_input_embeddings().weight.detach().numpy()
    m = _manifest(int4_art)
    args = (tmp_path / "fp32.onnx", llm_model_info(model.llm), info, m.graphs.llm, table)
    good = verify_quantized(int4_art / "llm.onnx", *args)
    assert good.ok, good.line()
    assert 0.05 < good.weights["worst_rel_rms"]["int4"] < good.weights["limits"]["int4"]
    proto = onnx.load(str(int4_art / "llm.onnx"))
    node = next(n for n in proto.graph.node if n.op_type == "MatMulNBits" and "mlp.down_proj" in n.name)
    init = next(t for t in proto.graph.initializer if t.name == node.input[2])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.5), init.name))
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    bad = verify_quantized(tmp_path / "bad.onnx", *args)
    assert not bad.ok and "down_proj" in bad.argmax and "fp32 source" in bad.argmax


def test_refuses_when_onnxruntime_lacks_the_operator(monkeypatch):
    import onnxruntime.quantization.matmul_nbits_quantizer as mq

    from legion_rt.export import quantize

    class Broken:
        def __init__(self, *a, **k):
            raise RuntimeError("Could not find an implementation for MatMulNBits(1) node")

    monkeypatch.setattr(mq, "MatMulNBitsQuantizer", Broken)
    with pytest.raises(ExportError) as err:
        quantize.check_matmul_nbits(4)
    msg = str(err.value)
    assert "\n" not in msg and "MatMulNBits" in msg and "int4" in msg and ort.__version__ in msg


def test_export_refuses_before_reading_weights(monkeypatch, tiny_paths, tmp_path):
    """The export asks ONNX Runtime first: the refusal comes before the checkpoint is loaded."""
    import legion_rt.export.checkpoint as ck
    from legion_rt.export import quantize

    def unavailable(bits):
        raise ExportError(f"onnxruntime 0.0 cannot quantize or run a {bits}-bit MatMulNBits (test)")

    def no_load(*a, **k):
        raise AssertionError("the checkpoint was loaded")

    monkeypatch.setattr(quantize, "check_matmul_nbits", unavailable)
    monkeypatch.setattr("legion_rt.export.onnx_export.check_matmul_nbits", unavailable)
    monkeypatch.setattr(ck, "load_legion", no_load)
    with pytest.raises(ExportError, match="MatMulNBits"):
        _export(tiny_paths, tmp_path / "x", "int8")
    assert not (tmp_path / "x").exists()


def test_quantized_needs_the_gqa_graph(tiny_paths, tmp_path):
    with pytest.raises(ExportError, match="GQA llm.onnx only"):
        _export(tiny_paths, tmp_path / "x", "int4", llm_graph="standard")


def test_precision_argument(tiny_paths, tmp_path):
    from legion_rt.cli import build_parser

    args = build_parser().parse_args(
        ["export", "--checkpoint", "c", "--clip", "c", "--out", "o", "--precision", "int4"]
    )
    assert args.precision == "int4"
    with pytest.raises(ExportError, match="precision 'int3'"):
        _export(tiny_paths, tmp_path / "x", "int3")


# ---------------------------------------------------------------------------------------------- the manifest
def test_manifest_quant_record_is_checked(int4_art):
    doc = json.loads((int4_art / "manifest.json").read_text())
    assert doc["graphs"]["llm"]["quant"]["method"] == "MatMulNBits"
    for change, match in (
        (lambda d: d["graphs"]["llm"].pop("quant"), r"graphs\.llm\.quant: missing"),
        (lambda d: d["graphs"]["llm"]["quant"].update(bits=8), r"graphs\.llm\.quant\.bits"),
        (lambda d: d["graphs"]["llm"]["quant"].update(block_size=48), r"block_size"),
        (lambda d: d["graphs"]["llm"]["quant"].update(symmetric="yes"), r"graphs\.llm\.quant\.symmetric"),
        (lambda d: d.update(precision="fp32"), r"graphs\.llm\.precision"),
    ):
        bad = json.loads(json.dumps(doc))
        change(bad)
        with pytest.raises(ArtifactError, match=match):
            Manifest.from_json(bad)
    old = json.loads(json.dumps(doc))  # an fp32 manifest without the key still parses (optional field)
    old["precision"] = old["graphs"]["llm"]["precision"] = "fp32"
    old["graphs"]["llm"].pop("quant")
    assert Manifest.from_json(old).graphs.llm.quant is None


# ---------------------------------------------------------------------------------------------- memory plan
def _check_plan_against_files(art, *, llm_rtol=0.03, sizes_rtol=0.25):
    m = _manifest(art)
    real = {f: e.bytes for f, e in m.files.items()}
    files = plan_memory(art, max_new_tokens=64)  # the manifest and its files
    sizes = plan_memory(m, max_new_tokens=64)  # the manifest's sizes only (no files)
    for plan in (files, sizes):
        assert plan.graphs["llm"] == pytest.approx(real["llm.onnx"], rel=llm_rtol)
        assert plan.graphs["embed_tokens"] == pytest.approx(real["embed_tokens.npy"], rel=0.01)
        assert plan.graphs["mask_head"] == pytest.approx(real["mask_head.onnx"], rel=0.02)
    for name in ("vision", "sam_encoder"):
        assert files.graphs[name] == real[f"{name}.onnx"]
        assert sizes.graphs[name] == pytest.approx(real[f"{name}.onnx"], rel=sizes_rtol)
    # KV cache: exactly what the runtime allocates for prompt + 64 positions
    kv = 2 * m.model.num_layers * m.model.num_kv_heads * m.model.head_dim * (m.prompt_length + 64) * 4
    assert files.kv_cache == kv
    return files


def test_memory_plan_tiny(tiny_artifacts, int4_art):
    for art in (tiny_artifacts, int4_art):
        _check_plan_against_files(art)


@pytest.mark.slow
def test_memory_plan_tiny_int8(int8_art):
    _check_plan_against_files(int8_art)


def test_memory_plan_7b_and_limits():
    plans = {p: plan_memory("legion-7b", p, max_new_tokens=512) for p in ("fp32", "fp16", "int8", "int4")}
    llm = {p: plans[p].graphs["llm"] / 2**30 for p in plans}
    assert 24 < llm["fp32"] < 26 and 12 < llm["fp16"] < 13 and 3.5 < llm["int4"] < 4.2
    assert plans["int4"].kv_cache == 2 * 32 * 32 * 128 * 4 * (plans["int4"].prompt_length + 512)
    p = plans["int4"]
    n = p.max_new_tokens_within(p.total)
    assert n == 512
    assert p.max_new_tokens_within(p.weights) == 0
    with pytest.raises(ValueError, match="precision"):
        plan_memory("legion-7b", "int2")


def test_engine_refuses_a_request_over_max_memory(tiny_artifacts):
    import legion_rt

    plan = plan_memory(tiny_artifacts, max_new_tokens=64)
    with legion_rt.Engine(tiny_artifacts, threads=2, max_memory=plan.total) as eng:
        eng.request(DEMO, max_new_tokens=64).close()  # fits exactly
        with pytest.raises(RequestError) as err:
            eng.request(DEMO, max_new_tokens=65)
        msg = str(err.value)
        assert "\n" not in msg and "max_memory" in msg and "max_new_tokens <= 64 fits" in msg
        assert eng.running_requests == 0


@pytest.mark.slow
def test_small_int4_end_to_end(tmp_path_factory):
    """The small model (6 layers, H=512) in int4: export with verification, plan against its files, analyze."""
    import legion_rt
    from legion_rt.export.tiny import make_tiny

    base = tmp_path_factory.mktemp("small-int4")
    paths = make_tiny(base / "ckpt", seed=0, size="small", steer="free")
    art = _export(paths, base / "art", "int4")
    plan = _check_plan_against_files(art)
    assert plan.graphs["llm"] < 0.25 * 79_047_332  # the small fp32 llm.onnx: 79 MB (2026-11-29)
    with legion_rt.Engine(art, threads=2) as eng:
        r = eng.analyze(DEMO, max_new_tokens=32)
    assert r is not None


def test_dequantized_reference_is_the_quantizer_math(tmp_path):
    """export.quantize.dequantized_graph against a MatMulNBits run in ONNX Runtime, both bit widths and
    zero-point modes, K not a multiple of the block."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from legion_rt.export.quantize import dequantized_graph, quantize_file

    rng = np.random.default_rng(1)
    K, N = 80, 24
    w = rng.standard_normal((K, N)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="m")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, N])],
                          initializer=[numpy_helper.from_array(w, "w")])  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    x = rng.standard_normal((3, K)).astype(np.float32)
    for bits in (4, 8):
        for sym in (True, False):
            quantize_file(tmp_path / "m.onnx", tmp_path / "q.onnx", bits=bits, block_size=32, symmetric=sym,
                          lm_head_bits=0)  # fmt: skip
            assert dequantized_graph(tmp_path / "q.onnx", tmp_path / "d.onnx") == 1
            yq = ort.InferenceSession(str(tmp_path / "q.onnx")).run(None, {"x": x})[0]
            yd = ort.InferenceSession(str(tmp_path / "d.onnx")).run(None, {"x": x})[0]
            assert np.abs(yq - yd).max() <= 1e-4 * np.abs(yd).max(), (bits, sym)
            assert np.abs(yd - x @ w).max() > 1e-4 * np.abs(yd).max()  # it is quantized
