"""The standard-operator LLM graph (kind ``standard_kv``, export/onnx_llm_standard.py) against the GroupQueryAttention
graph (``gqa_shared_kv``) and eager transformers on ONNX Runtime's CPU provider: same greedy tokens, hidden states and
logits within the measured fp32 tolerance; the export option (``--llm-graph``) and the manifest entry."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="export-stage tests need torch (pip install .[export])")
transformers = pytest.importorskip("transformers", reason="export-stage tests need transformers")
onnx = pytest.importorskip("onnx", reason="export-stage tests need onnx")

from legion_rt.backends.ort_llm import OrtLLM  # noqa: E402
from legion_rt.errors import RequestError  # noqa: E402
from legion_rt.export.onnx_llm import build_llm_graph, llm_model_info  # noqa: E402
from legion_rt.export.onnx_llm_standard import STANDARD_OPSET, build_standard_llm_graph, standard_only  # noqa: E402

# Measured on this machine (fp32, CPU, onnxruntime 1.32), standard graph vs GQA graph over prefill + 40 greedy
# steps: random llama (lm_head x8, logits ~5-7, 4 configs): logits <= 3.1e-6, hidden <= 1.2e-6; tiny LEGION LLM
# (logits ~2.7e3, 615-position prompt): logits 1.2e-3 (4.6e-7 relative), hidden 1.2e-5. Against eager transformers the GQA graph's own limits (test_ort_llm.py:
# 1e-5 / 5e-6) hold for the standard graph too. Limits ~5-10x the measurement.
LOGITS_ATOL = 1e-5
HIDDEN_ATOL = 5e-6

# ONNX operators TensorRT 10.3's ONNX parser supports (a subset of its operators.md list, the ones this graph uses).
TRT_PARSED_OPS = {
    "Add", "Cast", "Concat", "Div", "Gather", "Greater", "Identity", "MatMul", "Mul", "Range", "ReduceMean",
    "Reshape", "Shape", "Sigmoid", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Transpose", "Unsqueeze", "Where",
}  # fmt: skip


def _llama(seed, **kw):
    from tests.test_ort_llm import _llama as make

    return make(seed, **kw)


def _pair(model, tmp_path, threads=1):
    info = llm_model_info(model)
    gqa = build_llm_graph(model, tmp_path / "gqa.onnx")
    std = build_standard_llm_graph(model, tmp_path / "std.onnx")
    return (
        OrtLLM(tmp_path / "gqa.onnx", info, gqa, threads=threads),
        OrtLLM(tmp_path / "std.onnx", info, std, threads=threads),
    )


def _greedy_both(a: OrtLLM, b: OrtLLM, table, chunks, steps):
    """Feed ``chunks`` (prefix via clone_cache, then the rest) and ``steps`` greedy steps to both runners, each
    choosing its own tokens. Returns tokens of each, max |logits diff|, max |hidden diff|, max |logits|."""
    runs = []
    for r in (a, b):
        prefix = r.new_cache(chunks[0].shape[1])
        r.forward(prefix, chunks[0])
        cache = r.clone_cache(prefix, sum(c.shape[1] for c in chunks) + steps)
        for c in chunks[1:]:
            logits, hidden = r.forward(cache, c)
        outs, tokens = [(logits, hidden)], []
        for _ in range(steps):
            tokens.append(int(np.argmax(outs[-1][0])))
            outs.append(r.forward(cache, table[tokens[-1]][None, None]))
        assert cache.length == sum(c.shape[1] for c in chunks) + steps and prefix.length == chunks[0].shape[1]
        runs.append((tokens, outs))
    (ta, oa), (tb, ob) = runs
    err_l = max(float(np.abs(x[0] - y[0]).max()) for x, y in zip(oa, ob, strict=True))
    err_h = max(float(np.abs(x[1] - y[1]).max()) for x, y in zip(oa, ob, strict=True))
    return ta, tb, err_l, err_h, max(float(np.abs(x[0]).max()) for x in oa)


def test_standard_graph_uses_standard_operators_only(tmp_path):
    model = _llama(0)
    build_standard_llm_graph(model, tmp_path / "std.onnx")
    build_llm_graph(model, tmp_path / "gqa.onnx")
    proto = onnx.load(str(tmp_path / "std.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert standard_only(tmp_path / "std.onnx") == []
    assert standard_only(tmp_path / "gqa.onnx")  # the check does see contrib ops
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", STANDARD_OPSET)]
    assert {n.op_type for n in proto.graph.node} <= TRT_PARSED_OPS
    names = [i.name for i in proto.graph.input]
    assert "seqlens_k" not in names and "past_key_values.1.value" in names


@pytest.mark.parametrize(
    "seed,kw",
    [
        (0, {}),
        (1, {"theta": 500000.0}),
        (2, {"kv_heads": 4}),
        (3, {"heads": 8, "kv_heads": 2, "hidden": 128}),
    ],
    ids=["gqa2", "theta5e5", "mha", "gqa4"],
)
def test_standard_graph_matches_gqa_graph_and_eager(tmp_path, seed, kw):
    """Random LlamaForCausalLM: prefix -> clone -> image-like embeddings + suffix -> 40 greedy steps. The two
    graphs choose the same tokens; logits/hidden agree within the measured fp32 tolerance; and the standard
    graph against eager transformers too (the GQA graph's limits)."""
    model = _llama(seed, **kw)
    H = model.config.hidden_size
    gqa, std = _pair(model, tmp_path)
    rng = np.random.default_rng(seed)
    table = model.model.embed_tokens.weight.detach().numpy()
    chunks = [table[rng.integers(0, 300, 9)][None], rng.standard_normal((1, 30, H), dtype=np.float32),
              table[rng.integers(0, 300, 6)][None]]  # fmt: skip
    ta, tb, err_l, err_h, mag = _greedy_both(gqa, std, table, chunks, 40)
    print(f"\nstandard vs GQA ({seed}, {kw}): logits {err_l:.3g} (|max| {mag:.3g}), hidden {err_h:.3g}")
    assert ta == tb and len(set(ta)) > 3
    assert err_l < LOGITS_ATOL and err_h < HIDDEN_ATOL

    from transformers import DynamicCache

    ref_cache = DynamicCache(config=model.config)
    cache = std.new_cache(45 + 10)
    worst_l = worst_h = 0.0
    x = np.concatenate(chunks, axis=1)
    logits, hidden = std.forward(cache, x)
    for _ in range(10):
        with torch.no_grad():
            out = model(
                inputs_embeds=torch.from_numpy(x), cache=ref_cache, use_cache=True, output_hidden_states=True
            )
        ref_cache = out.cache
        ref_l, ref_h = out.logits[0, -1].numpy(), out.hidden_states[-1][0, -1].numpy()
        worst_l = max(worst_l, float(np.abs(logits - ref_l).max()))
        worst_h = max(worst_h, float(np.abs(hidden - ref_h).max()))
        tok = int(np.argmax(ref_l))
        assert int(np.argmax(logits)) == tok
        x = table[tok][None, None]
        logits, hidden = std.forward(cache, x)
    print(f"standard vs eager: logits {worst_l:.3g}, hidden {worst_h:.3g}")
    assert worst_l < LOGITS_ATOL and worst_h < HIDDEN_ATOL


def test_standard_cache_clone_is_independent_and_limits_hold(tmp_path):
    model = _llama(4)
    _, std = _pair(model, tmp_path)
    rng = np.random.default_rng(4)
    a, b, c = (rng.standard_normal((1, s, 64), dtype=np.float32) for s in (5, 3, 1))
    straight = std.new_cache(12)
    assert straight.keys[0].shape == (1, 2, 0, 16)
    std.forward(straight, a)
    want, want_h = std.forward(straight, b)
    prefix = std.new_cache(5)
    std.forward(prefix, a)
    before = [k.copy() for k in prefix.keys + prefix.values]
    first = std.clone_cache(prefix, 12)
    got, got_h = std.forward(first, b)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_h, want_h)
    std.forward(std.clone_cache(prefix, 12), c)
    for x, y in zip(before, prefix.keys + prefix.values, strict=True):
        np.testing.assert_array_equal(x, y)
    assert first.keys[0].shape == (1, 2, 8, 16) and first.length == 8
    with pytest.raises(RequestError, match="overflow"):
        std.forward(std.new_cache(4), np.zeros((1, 5, 64), np.float32))
    with pytest.raises(RequestError, match="smaller"):
        std.clone_cache(first, 7)
    with pytest.raises(RequestError, match="max_position"):
        std.new_cache(257)


def test_fp16_standard_graph_is_valid_and_keeps_norms_and_softmax_in_fp32(tmp_path):
    model = _llama(5)
    info = build_standard_llm_graph(model, tmp_path / "std16.onnx", precision="fp16")
    assert info.kind == "standard_kv" and info.kv_dtype == "float16" and info.precision == "fp16"
    proto = onnx.load(str(tmp_path / "std16.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    fp32_casts = [
        n.name for n in proto.graph.node if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT
    ]
    # every RMSNorm (2 per layer + final) and every softmax input is cast to fp32, and logits/hidden outputs
    assert sum(".to_fp32" in n for n in fp32_casts) == 2 * 2 + 1
    assert sum("scores_fp32" in n for n in fp32_casts) == 2


# ------------------------------------------------------------------------------------------ tiny LEGION model
@pytest.fixture(scope="module")
def tiny_llm(tiny_paths):
    from legion_rt.export.checkpoint import load_legion

    return (
        load_legion(tiny_paths.checkpoint, tiny_paths.clip, detector=tiny_paths.detector).float().eval().llm
    )


def test_tiny_llm_standard_vs_gqa(tmp_path, tiny_llm):
    """The tiny LEGION LLM (planted large logit margins): a 600-position prompt like the real one, 40 steps."""
    gqa, std = _pair(tiny_llm, tmp_path)
    H = tiny_llm.config.hidden_size
    table = tiny_llm.get_input_embeddings().weight.detach().float().numpy()
    rng = np.random.default_rng(0)
    chunks = [table[[1, 5, 9]][None], rng.standard_normal((1, 576, H), dtype=np.float32) * 0.02,
              table[rng.integers(3, table.shape[0], 12)][None]]  # fmt: skip
    ta, tb, err_l, err_h, mag = _greedy_both(gqa, std, table, chunks, 40)
    print(f"\ntiny: standard vs GQA logits {err_l:.3g} (|max| {mag:.3g}), hidden {err_h:.3g}")
    assert ta == tb
    # relative to the logits' magnitude (make_tiny plants logits of ~1e3), as the export's rms rule does
    assert err_l <= 5e-6 * mag and err_h < 1e-4


@pytest.mark.slow
def test_export_both_records_two_llm_graphs_and_verifies_the_second(tmp_path, tiny_paths):
    from legion_rt.artifacts import load_artifacts
    from legion_rt.export.onnx_export import export_artifacts

    out = export_artifacts(checkpoint=tiny_paths.checkpoint, clip=tiny_paths.clip, detector=tiny_paths.detector,
                           out=tmp_path / "art", progress=False, llm_graph="both")  # fmt: skip
    art = load_artifacts(out)
    g = art.manifest.graphs
    assert g.llm.kind == "gqa_shared_kv" and g.llm_standard.kind == "standard_kv"
    assert g.llm_standard.file == "llm_standard.onnx" and "llm_standard.onnx" in art.manifest.files
    assert g.tensorrt_llm() == ("llm_standard", g.llm_standard)
    doc = json.loads((out / "manifest.json").read_text())
    check = doc["verification"]["llm_standard"]
    assert check["max_abs_err"] <= check["limit"] and check["rule"] == doc["verification"]["llm"]["rule"]
    assert (
        "identical" in check["greedy_argmax"]
        or check["greedy_argmax"] == doc["verification"]["llm"]["greedy_argmax"]
    )
    assert standard_only(out / "llm_standard.onnx") == []


@pytest.mark.slow
def test_export_standard_only_runs_in_the_engine(tmp_path, tiny_paths, tiny_artifacts):
    """--llm-graph standard: llm.onnx is the standard graph and the Engine drives it; same text as the GQA
    artifacts on the same picture."""
    from legion_rt.engine import Engine
    from legion_rt.export.onnx_export import export_artifacts

    out = export_artifacts(checkpoint=tiny_paths.checkpoint, clip=tiny_paths.clip, detector=tiny_paths.detector,
                           out=tmp_path / "art", progress=False, llm_graph="standard", verify=False)  # fmt: skip
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["graphs"]["llm"]["kind"] == "standard_kv" and doc["graphs"]["llm_standard"] is None
    picture = np.random.default_rng(1).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    results = []
    for art in (tiny_artifacts, out):
        with Engine(art, backend="onnxruntime", threads=1) as engine:
            results.append(engine.analyze(picture, max_new_tokens=24))
    assert results[0].token_ids == results[1].token_ids and results[0].text
    assert len(results[0].artifacts) == len(results[1].artifacts)
    np.testing.assert_array_equal(results[0].mask, results[1].mask)


def test_cli_llm_graph_option():
    from legion_rt import cli

    base = ["export", "--checkpoint", "c", "--clip", "v", "--out", "o"]
    assert cli.build_parser().parse_args(base).llm_graph == "gqa"
    assert cli.build_parser().parse_args([*base, "--llm-graph", "both"]).llm_graph == "both"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([*base, "--llm-graph", "trt"])


def test_unknown_llm_graph_choice_is_an_export_error(tmp_path):
    from legion_rt.export.llm_graphs import build_llm_graphs
    from legion_rt.export.onnx_llm import ExportError

    with pytest.raises(ExportError, match="gqa, standard, both"):
        build_llm_graphs(_llama(0), tmp_path, which="trt")
