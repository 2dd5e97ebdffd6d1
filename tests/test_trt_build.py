"""``legion-rt build-engines`` without TensorRT (stand-in ``tensorrt`` / cuda-python from tests/cuda_standin.py):
the four graphs, optimization profiles from the manifest, the timing cache, --workspace-gb, fp32 layers, the
engines.json record and every refusal at load time; the TensorRT LLM driver (TrtLLM) over the standard graph run
by ONNX Runtime in place of an engine. Building and running real engines needs TensorRT and a GPU: not here."""

from __future__ import annotations

import hashlib
import json
import types
from pathlib import Path

import numpy as np
import pytest

from legion_rt.backends import tensorrt as trt_backend
from legion_rt.backends import trt_records
from legion_rt.backends.cuda_rt import CudaRuntime
from legion_rt.errors import BackendError, RequestError
from legion_rt.manifest import (
    FileEntry,
    Graph,
    Graphs,
    LlmGraph,
    Manifest,
    ModelInfo,
    Normalization,
    Preprocess,
    Prompt,
    TokenIds,
)
from tests.cuda_standin import FakeCudart, fake_trt

H, KVH, D, L = 64, 2, 32, 2
PREFIX, SUFFIX = (1, 5, 6), (7, 8, 9, 10)
PROMPT = len(PREFIX) + 576 + len(SUFFIX)


def _manifest(root: Path, *, llm_graph: str = "both", precision: str = "fp32") -> Manifest:
    files = {}

    def entry(name: str, data: bytes) -> str:
        (root / name).write_bytes(data)
        files[name] = FileEntry(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
        return name

    g = {n: Graph(file=entry(f"{n}.onnx", n.encode()), inputs=(), outputs=(), precision=precision)
         for n in ("vision", "sam_encoder", "mask_head")}  # fmt: skip
    gqa = LlmGraph(file=entry("llm.onnx", b"gqa"), inputs=(), outputs=(), precision=precision)
    std = LlmGraph(
        file=entry("llm_standard.onnx" if llm_graph == "both" else "llm.onnx", b"standard"),
        inputs=(),
        outputs=(),
        precision=precision,
        kind="standard_kv",
    )
    graphs = {
        "gqa": Graphs(**g, llm=gqa),
        "standard": Graphs(**g, llm=std),
        "both": Graphs(**g, llm=gqa, llm_standard=std),
    }
    model = ModelInfo(name="t", hidden_size=H, num_layers=L, num_heads=4, num_kv_heads=KVH, head_dim=D,
                      intermediate_size=128, vocab_size=100, max_position_embeddings=1024, rms_norm_eps=1e-5,
                      rope_theta=1e4, clip_hidden_size=32, num_image_tokens=576, sam_embed_dim=256,
                      sam_embedding_hw=(64, 64), low_res_hw=(256, 256))  # fmt: skip
    norm = Normalization(size=336, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    m = Manifest(precision=precision, model=model, tokens=TokenIds(*range(11)),
                 prompt=Prompt(prefix_ids=PREFIX, suffix_ids=SUFFIX), preprocess=Preprocess(clip=norm, sam=norm),
                 detector=True, graphs=graphs[llm_graph], files=files)  # fmt: skip
    m.validate()
    return m


def _art(root: Path, **kw):
    m = _manifest(root, **kw)
    return types.SimpleNamespace(root=root, manifest=m, path=lambda f: root / f, graph_path=None)


INPUTS = {
    "vision.onnx": [("pixel_values", (-1, 3, 336, 336))],
    "sam_encoder.onnx": [("pixel_values", (1, 3, 1024, 1024))],
    "mask_head.onnx": [("seg_hidden", (-1, H)), ("image_embeddings", (1, 256, 64, 64))],
    "llm": [("inputs_embeds", (-1, -1, H))]
    + [(f"past_key_values.{i}.{kv}", (-1, KVH, -1, D)) for i in range(L) for kv in ("key", "value")],
}
LAYERS = [("SOFTMAX", "attn.softmax"), ("MATRIX_MULTIPLY", "q_proj"), ("REDUCE", "input_layernorm.mean"),
          ("ELEMENTWISE", "model.layers.0.input_layernorm.weight.div"), ("ELEMENTWISE", "mlp.silu"),
          ("SHAPE", "past_len_1d")]  # fmt: skip


@pytest.fixture
def trt(monkeypatch):
    """fake_trt 10.3 plus what build-engines uses beyond it: per-file inputs, layers, timing cache."""
    trt = fake_trt("10.3.0")
    trt.float32, trt.float16, trt.int64 = "float32", "float16", "int64"
    trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS = "BuilderFlag.OBEY_PRECISION_CONSTRAINTS"
    base_parser, base_builder = trt.OnnxParser, trt.Builder

    class Layer:
        def __init__(self, kind, name):
            self.type, self.name, self.precision, self.num_outputs = f"LayerType.{kind}", name, None, 1
            self.out = types.SimpleNamespace(dtype="int64" if kind == "SHAPE" else "float32")
            self.output_types = {}

        def get_output(self, j):
            return self.out

        def set_output_type(self, j, t):
            self.output_types[j] = t

    class Parser(base_parser):
        def parse_from_file(self, path):
            trt.log.append(("parse", path))
            name = Path(path).name
            spec = INPUTS.get(name, INPUTS["llm"])
            self.network.inputs = [types.SimpleNamespace(name=n, shape=s) for n, s in spec]
            self.network.layers = [Layer(*x) for x in LAYERS]
            self.network.num_layers = len(self.network.layers)
            self.network.get_layer = self.network.layers.__getitem__
            trt.networks.append(self.network)
            return True

    class Cache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return memoryview(self.data + b"+timing")

    class Builder(base_builder):
        def create_builder_config(self):
            config = super().create_builder_config()

            def create_timing_cache(data):
                trt.log.append(("timing_cache_in", bytes(data)))
                return Cache(data)

            config.create_timing_cache = create_timing_cache
            config.set_timing_cache = lambda c, ignore: setattr(config, "cache", c) or True
            config.get_timing_cache = lambda: config.cache
            return config

    trt.OnnxParser, trt.Builder, trt.networks = Parser, Builder, []
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", trt)
    monkeypatch.setattr(trt_backend, "CudaRuntime", lambda: CudaRuntime(FakeCudart()))
    return trt


def _profiles(trt):
    return [e[1] for e in trt.log if e[0] == "profile"]


def test_builds_four_engines_with_profiles_from_the_manifest(tmp_path, trt):
    art = _art(tmp_path, precision="fp16")
    out = trt_backend.build_engines(art, workspace_gb=1.5, log=lambda m: None)
    meta = json.loads((out / "engines.json").read_text())
    assert list(meta["engines"]) == ["vision", "sam_encoder", "mask_head", "llm"]
    assert [Path(e[1]).name for e in trt.log if e[0] == "parse"][-1] == "llm_standard.onnx"
    vision, sam, head, llm = _profiles(trt)
    assert vision == {"pixel_values": ([1, 3, 336, 336],) * 3} and sam == {}
    assert head["seg_hidden"] == ([1, H], [4, H], [32, H])
    assert llm["inputs_embeds"] == ([1, 1, H], [1, 1, H], [1, PROMPT, H])
    for i in range(L):
        for kv in ("key", "value"):
            assert llm[f"past_key_values.{i}.{kv}"] == (
                [1, KVH, 0, D],
                [1, KVH, PROMPT, D],
                [1, KVH, 1023, D],
            )
    assert ("pool", "WORKSPACE", int(1.5 * 1024**3)) in trt.log
    for g, e in meta["engines"].items():
        assert e["sha256"] == hashlib.sha256((out / e["file"]).read_bytes()).hexdigest()
        assert e["source_sha256"] == art.manifest.files[e["source"]].sha256
        assert (
            e["profile"] == {k: [list(x) for x in v] for k, v in (llm if g == "llm" else {}).items()}
            or g != "llm"
        )
    assert meta["tensorrt"] == "10.3.0" and meta["machine"] == trt_records.machine_id()
    assert meta["gpu"] == out.name == "Fake_GPU_9000-sm90-trt10.3.0" and meta["workspace_gb"] == 1.5


def test_max_context_sets_the_kv_profile_and_bad_values_are_refused_before_building(tmp_path, trt):
    art = _art(tmp_path, llm_graph="standard", precision="fp16")
    trt_backend.build_engines(art, max_context=700, log=lambda m: None)
    assert _profiles(trt)[3]["past_key_values.0.key"][2] == [1, KVH, 699, D]
    trt.log.clear()
    for bad in (PROMPT, 1025):
        with pytest.raises(BackendError, match="--max-context"):
            trt_backend.build_engines(art, max_context=bad, log=lambda m: None)
    assert trt.log == []


def test_without_a_standard_llm_graph_three_engines_and_a_message(tmp_path, trt):
    said = []
    out = trt_backend.build_engines(_art(tmp_path, llm_graph="gqa", precision="fp16"), log=said.append)
    assert list(json.loads((out / "engines.json").read_text())["engines"]) == [
        "vision",
        "sam_encoder",
        "mask_head",
    ]
    assert "--llm-graph standard" in said[0] and "ONNX Runtime's CUDA provider" in said[0]


def test_timing_cache_is_kept_and_reused(tmp_path, trt):
    art = _art(tmp_path, precision="fp16")
    out = trt_backend.build_engines(art, log=lambda m: None)
    ins = [e[1] for e in trt.log if e[0] == "timing_cache_in"]
    assert ins[0] == b"" and all(
        b.startswith(b"+timing") for b in ins[1:]
    )  # later graphs reuse earlier timings
    saved = (out / "timing.cache").read_bytes()
    trt.log.clear()
    trt_backend.build_engines(art, log=lambda m: None)
    assert [e[1] for e in trt.log if e[0] == "timing_cache_in"][0] == saved
    trt.log.clear()
    trt_backend.build_engines(art, log=lambda m: None, timing_cache=False)
    assert not [e for e in trt.log if e[0] == "timing_cache_in"]


def test_sensitive_layers_stay_fp32_in_a_weakly_typed_build_only(tmp_path, trt):
    trt_backend.build_engines(_art(tmp_path, precision="fp32"), fp32_layers=("*silu*",), log=lambda m: None)
    layers = trt.networks[-1].layers
    kept = [la.name for la in layers if la.precision == "float32"]
    assert kept == [
        "attn.softmax",
        "input_layernorm.mean",
        "model.layers.0.input_layernorm.weight.div",
        "mlp.silu",
    ]
    assert all(la.output_types == {0: "float32"} for la in layers if la.precision)
    assert ("flag", "BuilderFlag.OBEY_PRECISION_CONSTRAINTS") in trt.log
    meta = json.loads((tmp_path / "tensorrt" / "Fake_GPU_9000-sm90-trt10.3.0" / "engines.json").read_text())
    assert meta["engines"]["llm"]["fp32_layers"] == 4 and meta["options"]["fp32_layers"] == ["*silu*"]
    trt.networks.clear()
    trt.log.clear()
    trt_backend.build_engines(
        _art(tmp_path, precision="fp16"), log=lambda m: None
    )  # strongly typed: the graph's
    assert not any(la.precision for n in trt.networks for la in n.layers)
    assert ("flag", "BuilderFlag.OBEY_PRECISION_CONSTRAINTS") not in trt.log


def test_workspace_must_be_positive(tmp_path, trt):
    with pytest.raises(BackendError, match="workspace"):
        trt_backend.build_engines(_art(tmp_path), workspace_gb=0, log=lambda m: None)


# ---------------------------------------------------------------------------------------- load-time refusals
def _built(tmp_path, trt):
    art = _art(tmp_path, precision="fp16")
    out = trt_backend.build_engines(art, log=lambda m: None)
    return art, out, json.loads((out / "engines.json").read_text())


def _check(art, meta, **over):
    kw = {"root": art.root, "trt_version": "10.3.0", "gpu": meta["gpu"], "manifest": art.manifest, **over}
    trt_records.check_record(meta, **kw)


def test_record_accepts_what_this_machine_built(tmp_path, trt):
    art, _out, meta = _built(tmp_path, trt)
    _check(art, meta)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda m: m.update(tensorrt="10.4.0"), "TensorRT '10.4.0'"),
        (lambda m: m.update(gpu="Orin-sm87-trt10.3.0"), "GPU"),
        (lambda m: m.update(machine="another-box"), "machine"),
        (lambda m: m.update(record_version=0), "unknown record format"),
        (lambda m: m.update(engines={}), "no engines recorded"),
        (
            lambda m: m["engines"]["mask_head"].update(source_sha256="0" * 64),
            "mask_head engine was built from another",
        ),
    ],
    ids=["trt-version", "gpu", "machine", "format", "empty", "source-graph"],
)
def test_record_refusals_say_rebuild(tmp_path, trt, change, match):
    art, _out, meta = _built(tmp_path, trt)
    gpu_here = meta["gpu"]
    change(meta)
    with pytest.raises(BackendError, match=match) as err:
        _check(art, meta, gpu=gpu_here)
    assert f"rebuild with `legion-rt build-engines {tmp_path}`" in str(err.value)


def test_backend_refuses_a_re_exported_graph_and_a_swapped_engine(tmp_path, trt):
    art, out, meta = _built(tmp_path, trt)
    trt.Runtime = lambda logger: types.SimpleNamespace(
        deserialize_cuda_engine=lambda data: pytest.fail("loaded")
    )
    (tmp_path / "again").mkdir()
    stale = _manifest(tmp_path / "again", precision="fp16")  # a re-export: vision.onnx changed
    art2 = types.SimpleNamespace(root=art.root, manifest=stale, path=art.path)
    object.__setattr__(stale.files["vision.onnx"], "sha256", "f" * 64)
    with pytest.raises(BackendError, match="vision engine was built from another.*rebuild"):
        trt_backend.TensorRTBackend(art2)
    (out / "vision.engine").write_bytes(b"someone else's code")
    with pytest.raises(BackendError, match="vision.engine: sha256 mismatch.*rebuild"):
        trt_backend.TensorRTBackend(art)
    (out / "engines.json").write_text("{not json")
    with pytest.raises(BackendError, match="not JSON.*rebuild"):
        trt_backend.TensorRTBackend(art)


def test_profile_refuses_unknown_dynamic_dimensions(tmp_path):
    m = _manifest(tmp_path)
    with pytest.raises(BackendError, match="no optimization profile"):
        trt_records.optimization_profile(m, "vision", {"pixel_values": (1, 3, -1, 336)})
    with pytest.raises(BackendError, match="expected a dynamic dimension 2"):
        trt_records.optimization_profile(m, "llm", {"past_key_values.0.key": (-1, KVH, 8, D)})


# ------------------------------------------------------------------------------------ TrtLLM over the graph
def test_trt_llm_driver_gives_the_ort_runner_s_tokens(tmp_path):
    """TrtLLM drives a stand-in engine whose run() is ONNX Runtime on the standard graph: same greedy tokens and
    bitwise-equal logits as OrtLLM on the same graph (the driver logic; the engine itself is not tested here)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import onnxruntime as ort

    from legion_rt.backends.ort_llm import OrtLLM
    from legion_rt.export.onnx_llm import llm_model_info
    from legion_rt.export.onnx_llm_standard import build_standard_llm_graph
    from tests.test_ort_llm import _llama

    model = _llama(0)
    info = build_standard_llm_graph(model, tmp_path / "s.onnx")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(tmp_path / "s.onnx"), opts, providers=["CPUExecutionProvider"])
    engine = types.SimpleNamespace(
        run=lambda feeds: dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    )
    trt_llm = trt_backend.TrtLLM(engine, llm_model_info(model), info, 100)
    ort_llm = OrtLLM(sess, llm_model_info(model), info)
    table = model.model.embed_tokens.weight.detach().numpy()
    x = np.random.default_rng(0).standard_normal((1, 12, 64), dtype=np.float32)
    results = []
    for r in (trt_llm, ort_llm):
        prefix = r.new_cache(4)
        r.forward(prefix, x[:, :4])
        cache = r.clone_cache(prefix, 40)
        logits, _ = r.forward(cache, x[:, 4:])
        toks = []
        for _ in range(10):
            toks.append(int(np.argmax(logits)))
            logits, hidden = r.forward(cache, table[toks[-1]][None, None])
        results.append((toks, logits, hidden, cache.length))
    assert results[0][0] == results[1][0] and results[0][3] == results[1][3] == 22
    np.testing.assert_array_equal(results[0][1], results[1][1])
    with pytest.raises(RequestError, match="max-context"):
        trt_llm.new_cache(101)
    with pytest.raises(RequestError, match="overflow"):
        trt_llm.forward(trt_llm.new_cache(2), x[:, :3])
    del torch


def test_cli_options_reach_build_engines(tmp_path, trt, monkeypatch):
    from legion_rt import cli

    seen = {}
    monkeypatch.setattr(cli, "load_artifacts", lambda root, verify: _art(tmp_path), raising=False)
    import legion_rt.artifacts

    monkeypatch.setattr(legion_rt.artifacts, "load_artifacts", lambda root, verify: _art(tmp_path))
    monkeypatch.setattr("legion_rt.cuda_available", lambda: True)
    monkeypatch.setattr(
        trt_backend, "build_engines", lambda art, precision, **kw: seen.update(kw) or tmp_path
    )
    args = cli.build_parser().parse_args(
        ["build-engines", str(tmp_path), "--workspace-gb", "1.5", "--max-context", "800", "--fp32-layers", "*gate*",
         "--fp32-layers", "lm_head", "--no-timing-cache"]
    )  # fmt: skip
    assert args.func(args) == 0
    assert seen["workspace_gb"] == 1.5 and seen["max_context"] == 800 and seen["timing_cache"] is False
    assert seen["fp32_layers"] == ("*gate*", "lm_head")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["build-engines", str(tmp_path), "--workspace-gb", "0"])
    args = cli.build_parser().parse_args(["build-engines", str(tmp_path)])
    assert args.workspace_gb == 8.0 and args.max_context is None and args.fp32_layers == []
