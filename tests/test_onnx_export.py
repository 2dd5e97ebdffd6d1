"""export/onnx_export.py: every graph of the tiny artifact directory against PyTorch, the LLM runner over the
exported artifact against eager transformers, the manifest, and the all-or-nothing artifact directory."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="export-stage tests need torch (pip install .[export])")
ort = pytest.importorskip("onnxruntime", reason="the runtime needs onnxruntime")

from legion_rt.backends.ort_llm import OrtLLM  # noqa: E402
from legion_rt.export.onnx_export import ExportError, export_artifacts  # noqa: E402
from legion_rt.export.verify import TOLERANCES  # noqa: E402
from legion_rt.manifest import LlmGraph, Manifest  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tiny_paths):
    from legion_rt.export.checkpoint import load_legion

    return load_legion(tiny_paths.checkpoint, tiny_paths.clip, detector=tiny_paths.detector).float().eval()


@pytest.fixture(scope="module")
def manifest(tiny_artifacts):
    return json.loads((tiny_artifacts / "manifest.json").read_text())


def _session(art: Path, name: str):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(art / name), opts, providers=["CPUExecutionProvider"])


def _check(name: str, got: np.ndarray, want: np.ndarray) -> float:
    """ORT vs PyTorch fp32 with the export's fallback rule (atol + rtol * rms of the PyTorch output)."""
    assert got.shape == want.shape, (name, got.shape, want.shape)
    err = float(np.abs(got - want).max())
    limit = TOLERANCES[name].limit(float(np.sqrt(np.mean(want.astype(np.float64) ** 2))))
    print(f"\n{name}: max abs err {err:.3g} (limit {limit:.3g})")
    assert err <= limit, f"{name}: {err} > {limit}"
    return err


# ---------------------------------------------------------------------------------------------- the manifest
def test_manifest_fields(manifest, tiny_paths, tiny_model):
    cfg = tiny_model.cfg
    assert manifest["format"] == "legion_rt.artifacts" and manifest["format_version"] == 2
    assert manifest["precision"] == "fp32"
    assert set(manifest["producer"]) >= {"legion_rt", "torch", "transformers", "onnx", "onnxruntime"}
    m = manifest["model"]
    assert (m["hidden_size"], m["num_layers"], m["num_heads"], m["vocab_size"]) == (
        cfg.hidden_size,
        cfg.num_layers,
        cfg.num_heads,
        cfg.vocab_size,
    )
    assert (
        m["num_image_tokens"] == 576 and m["low_res_hw"] == [256, 256] and m["sam_embedding_hw"] == [64, 64]
    )
    tokens = manifest["tokens"]
    assert tokens["bos"] == 1 and tokens["eos"] == 2 and tokens["seg"] == cfg.seg_token_id
    prefix, suffix = manifest["prompt"]["prefix_ids"], manifest["prompt"]["suffix_ids"]
    assert prefix[0] == 1 and prefix[-1] == tokens["im_start"] and suffix[0] == tokens["im_end"]
    from legion_rt.export.tokenizer import prompt_ids

    assert (prefix, suffix) == tuple(prompt_ids(tiny_paths.checkpoint))
    pre = json.loads((Path(tiny_paths.clip) / "preprocessor_config.json").read_text())
    assert manifest["preprocess"]["clip"]["mean"] == pytest.approx(pre["image_mean"])
    assert manifest["preprocess"]["clip"]["std"] == pytest.approx(pre["image_std"])
    assert manifest["preprocess"]["sam"]["mean"] == [123.675, 116.28, 103.53]
    assert manifest["detector"] is True
    llm = manifest["graphs"]["llm"]
    assert (
        llm["kind"] == "gqa_shared_kv"
        and llm["kv_dtype"] == "float32"
        and llm["precision"] == "fp32"
        and m["num_layers"] == cfg.num_layers
        and m["max_position_embeddings"] == cfg.max_position_embeddings
    )
    assert manifest["graphs"]["vision"]["outputs"] == ["image_embeds", "cls_logits"]
    ver = manifest["verification"]
    assert set(ver) == {"vision", "sam_encoder", "mask_head", "llm"}
    # the tiny model fits in memory as float64: every graph is judged by the fp64 ratio rule
    for name, entry in ver.items():
        assert entry["rule"] == "fp64_ratio", name
        assert entry["max_abs_err"] <= entry["limit"] and entry["torch_fp32_err"] > 0, (name, entry)
    assert ver["llm"]["greedy_argmax"] == "9/9 identical"


def test_manifest_lists_every_file_with_its_hash(tiny_artifacts, manifest):
    on_disk = {p.relative_to(tiny_artifacts).as_posix() for p in tiny_artifacts.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    assert {
        "vision.onnx",
        "sam_encoder.onnx",
        "mask_head.onnx",
        "llm.onnx",
        "embed_tokens.npy",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
    } <= set(manifest["files"])
    for name, entry in manifest["files"].items():
        data = (tiny_artifacts / name).read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()


def test_embeddings_and_tokenizer_files(tiny_artifacts, tiny_paths, tiny_model):
    table = np.load(tiny_artifacts / "embed_tokens.npy", mmap_mode="r")
    want = tiny_model.llm.get_input_embeddings().weight.detach().numpy()
    assert table.dtype == np.float32 and table.shape == want.shape
    np.testing.assert_array_equal(table, want)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        assert (tiny_artifacts / name).read_bytes() == (Path(tiny_paths.checkpoint) / name).read_bytes()
    from tokenizers import Tokenizer

    Tokenizer.from_file(str(tiny_artifacts / "tokenizer.json"))  # a valid `tokenizers` file


# ------------------------------------------------------------------------------------------ graphs vs torch
def test_vision_graph_matches_pytorch_batch_1_and_2(tiny_artifacts, tiny_model):
    sess = _session(tiny_artifacts, "vision.onnx")
    g = torch.Generator().manual_seed(11)
    for batch in (1, 2):
        px = torch.randn(batch, 3, 336, 336, generator=g)
        with torch.no_grad():
            patches, cls = tiny_model.clip_features(px)
            want_embeds = tiny_model.project(patches).numpy()
            want_logits = tiny_model.detect(cls).numpy()
        embeds, logits = sess.run(None, {"pixel_values": px.numpy()})
        assert embeds.shape == (batch, 576, tiny_model.cfg.hidden_size)
        _check("vision", embeds, want_embeds)
        _check("vision", logits, want_logits)


def test_sam_encoder_and_mask_head_match_pytorch(tiny_artifacts, tiny_model):
    g = torch.Generator().manual_seed(12)
    px = torch.randn(1, 3, 1024, 1024, generator=g)
    with torch.no_grad():
        want_emb = tiny_model.sam_encode(px).numpy()
    (emb,) = _session(tiny_artifacts, "sam_encoder.onnx").run(None, {"pixel_values": px.numpy()})
    _check("sam_encoder", emb, want_emb)
    head = _session(tiny_artifacts, "mask_head.onnx")
    for n in (1, 2, 5):  # dynamic number of masks, N = 1 included
        seg = torch.randn(n, tiny_model.cfg.hidden_size, generator=g) * 3
        with torch.no_grad():
            want = tiny_model.mask_head(seg, torch.from_numpy(want_emb)).numpy()
        (got,) = head.run(None, {"seg_hidden": seg.numpy(), "image_embeddings": want_emb})
        assert got.shape == (n, 256, 256)
        _check("mask_head", got, want)
        assert np.ptp(want) > 0  # the masks depend on their input: not a constant graph


def test_llm_runner_on_the_artifact_greedy_matches_eager(tiny_artifacts, manifest, tiny_model):
    """The real prompt: prefix ids (cached once, cloned), 576 image embeddings from vision.onnx, suffix ids,
    then 40 greedy steps; tokens identical to eager transformers, logits/hidden within tolerance."""
    from transformers import DynamicCache

    typed = Manifest.from_json(manifest)
    runner = OrtLLM(tiny_artifacts / "llm.onnx", typed.model, typed.graphs.llm, threads=1)
    table = np.load(tiny_artifacts / "embed_tokens.npy")
    prefix, suffix = manifest["prompt"]["prefix_ids"], manifest["prompt"]["suffix_ids"]
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(13))
    image = _session(tiny_artifacts, "vision.onnx").run(None, {"pixel_values": px.numpy()})[0]  # [1,576,H]
    steps = 40
    prefix_cache = runner.new_cache(len(prefix))
    runner.forward(prefix_cache, table[prefix][None])
    cache = runner.clone_cache(prefix_cache, len(prefix) + 576 + len(suffix) + steps)
    runner.forward(cache, image)
    logits, hidden = runner.forward(cache, table[suffix][None])

    llm = tiny_model.llm
    x = torch.from_numpy(np.concatenate([table[prefix][None], image, table[suffix][None]], axis=1))
    ref_cache = DynamicCache(config=llm.config)
    tokens, ref_tokens, err_l, err_h, mag_l, mag_h = [], [], 0.0, 0.0, 0.0, 0.0
    rms_l = rms_h = float("inf")
    for _ in range(steps):
        with torch.no_grad():
            out = llm(inputs_embeds=x, cache=ref_cache, use_cache=True, output_hidden_states=True)
        ref_cache = out.cache
        ref_l, ref_h = out.logits[0, -1].numpy(), out.hidden_states[-1][0, -1].numpy()
        err_l = max(err_l, float(np.abs(logits - ref_l).max()))
        err_h = max(err_h, float(np.abs(hidden - ref_h).max()))
        mag_l, mag_h = max(mag_l, float(np.abs(ref_l).max())), max(mag_h, float(np.abs(ref_h).max()))
        rms_l = min(rms_l, float(np.sqrt(np.mean(ref_l.astype(np.float64) ** 2))))
        rms_h = min(rms_h, float(np.sqrt(np.mean(ref_h.astype(np.float64) ** 2))))
        tokens.append(int(np.argmax(logits)))
        ref_tokens.append(int(np.argmax(ref_l)))
        x = torch.from_numpy(table[ref_tokens[-1]][None, None])
        logits, hidden = runner.forward(cache, table[tokens[-1]][None, None])
    print(
        f"\nllm artifact, prefill {cache.length - steps} + {steps} steps: logits err {err_l:.3g} (|max| {mag_l:.3g}), "
        f"hidden {err_h:.3g} (|max| {mag_h:.3g})"
    )
    assert tokens == ref_tokens
    # Measured (tiny, seed 0): logits 2.0e-3 on logits of magnitude ~1e3 (make_tiny plants large margins; rms
    # ~80), hidden 7.2e-6 (rms 1); the export's fallback rule (atol + rtol * rms) applies.
    assert err_l <= TOLERANCES["llm"].limit(rms_l) and err_h <= TOLERANCES["llm"].limit(rms_h)


# ---------------------------------------------------------------------------------------- all-or-nothing
def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_failed_export_leaves_no_directory(tmp_path, tiny_paths, monkeypatch):
    import legion_rt.export.graphs as gx

    def broken_export(module, args, path, **kwargs):
        path.write_bytes(b"half a graph")  # something was already written into the temporary directory
        raise ExportError(f"simulated failure while exporting {path.name}")

    monkeypatch.setattr(gx, "torch_export", broken_export)
    out = tmp_path / "art"
    with pytest.raises(ExportError, match="simulated"):
        export_artifacts(checkpoint=tiny_paths.checkpoint, clip=tiny_paths.clip, out=out, progress=False)
    assert not out.exists()
    assert _leftovers(tmp_path, "art") == []


def test_out_of_tolerance_aborts_and_keeps_the_old_directory(
    tmp_path, tiny_paths, tiny_artifacts, monkeypatch
):
    import shutil

    import legion_rt.export.verify as vx

    out = tmp_path / "art"
    shutil.copytree(tiny_artifacts, out)
    before = (out / "manifest.json").read_bytes()
    # zero tolerance (K = 0, no floor): the (measured, nonzero) rounding errors of the vision graph now fail
    monkeypatch.setattr(vx, "K_FP64", 0.0)
    monkeypatch.setattr(vx, "ULP_FLOOR", 0.0)
    with pytest.raises(ExportError, match=r"vision\.onnx: ONNX Runtime differs from the reference"):
        export_artifacts(checkpoint=tiny_paths.checkpoint, clip=tiny_paths.clip, out=out, progress=False)
    assert (out / "manifest.json").read_bytes() == before
    assert _leftovers(tmp_path, "art") == []


def test_refuses_to_overwrite_a_non_artifact_directory(tmp_path, tiny_paths):
    out = tmp_path / "not-art"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an artifact directory"):
        export_artifacts(checkpoint=tiny_paths.checkpoint, clip=tiny_paths.clip, out=out, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"


def test_bad_precision_is_a_typed_error(tmp_path, tiny_paths):
    with pytest.raises(ExportError, match="precision"):
        export_artifacts(
            checkpoint=tiny_paths.checkpoint, clip=tiny_paths.clip, out=tmp_path / "a", precision="int3"
        )


# ----------------------------------------------------------------------- fp16, external data, no detector
@pytest.mark.slow
def test_fp16_export_without_detector_and_with_external_data(tmp_path, tiny_paths, monkeypatch, capsys):
    """fp16 weights (f32 at the boundary), verified on the CPU provider; a 0-byte external-data threshold forces
    the > 2 GB layout (llm.onnx.data etc.), which must be listed and hashed like any file."""
    import legion_rt.export.graphs as gx
    import legion_rt.export.memory as mem
    import legion_rt.export.onnx_llm as ol

    monkeypatch.setattr(ol, "EXTERNAL_DATA_THRESHOLD", 0)
    monkeypatch.setattr(gx, "EXTERNAL_DATA_THRESHOLD", 0)
    monkeypatch.setattr(mem, "EXTERNAL_DATA_THRESHOLD", 0)
    out = export_artifacts(
        checkpoint=tiny_paths.checkpoint,
        clip=tiny_paths.clip,
        out=tmp_path / "art16",
        precision="fp16",
        progress=True,
    )
    printed = capsys.readouterr()
    assert "max abs err" in printed.out + printed.err  # the per-graph errors are printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "fp16" and manifest["detector"] is False
    assert manifest["graphs"]["llm"]["kv_dtype"] == "float16"
    assert manifest["graphs"]["vision"]["outputs"] == ["image_embeds"]
    assert np.load(out / "embed_tokens.npy", mmap_mode="r").dtype == np.float16
    for name in ("llm.onnx.data", "sam_encoder.onnx.data", "mask_head.onnx.data", "vision.onnx.data"):
        assert name in manifest["files"], name
    assert set(manifest["verification"]) == {"vision", "sam_encoder", "mask_head", "llm"}
    # The runner drives the fp16 graph with f32 inputs and outputs.
    typed = Manifest.from_json(manifest)
    assert {name: g.precision for name, g in typed.graphs.items()} == dict.fromkeys(
        ("vision", "sam_encoder", "mask_head", "llm"), "fp16"
    )
    runner = OrtLLM(out / "llm.onnx", typed.model, typed.graphs.llm, threads=1)
    cache = runner.new_cache(8)
    logits, hidden = runner.forward(cache, np.zeros((1, 3, manifest["model"]["hidden_size"]), np.float32))
    assert logits.dtype == np.float32 and np.isfinite(logits).all() and cache.keys[0].dtype == np.float16


# ------------------------------------------------------------------------ the verification rule can fail
def _corrupt_copy(art: Path, out: Path, names=("vision", "sam_encoder", "mask_head", "llm")) -> Path:
    """A copy of ``art`` whose graphs ``names`` each have one weight tensor (the largest float32 initializer
    feeding a MatMul / Conv / Gemm) perturbed by 1e-3 relative, with a random sign per element (a plain scaling
    can be invisible: the SAM neck's last conv feeds a LayerNorm, which undoes it)."""
    import shutil

    import onnx
    from onnx import numpy_helper

    shutil.copytree(art, out)
    for name in names:
        proto = onnx.load(str(out / f"{name}.onnx"))
        fed = {i for n in proto.graph.node if n.op_type in ("MatMul", "Conv", "Gemm") for i in n.input}
        inits = [
            t for t in proto.graph.initializer if t.name in fed and t.data_type == onnx.TensorProto.FLOAT
        ]
        t = max(inits, key=lambda t: int(np.prod(t.dims)))
        w = numpy_helper.to_array(t)
        signs = np.random.default_rng(0).choice(np.float32([-1, 1]), size=w.shape)
        t.CopyFrom(numpy_helper.from_array((w * (1 + np.float32(1e-3) * signs)).astype(np.float32), t.name))
        onnx.save(proto, str(out / f"{name}.onnx"))
    return out


def _llm_info(manifest):
    return LlmGraph(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in manifest["graphs"]["llm"].items()}
    )


@pytest.mark.parametrize("fp64", [True, False], ids=["fp64_ratio", "rms_rtol"])
def test_verification_passes_correct_graphs_and_fails_a_corrupted_weight(
    tiny_artifacts, tiny_model, manifest, tmp_path, monkeypatch, fp64
):
    """Both rules: the exported graphs pass on fresh inputs (seed 3; 20 seeds x tiny/small measured in
    export/verify.py), and every graph with one weight tensor off by 1e-3 relative fails."""
    import legion_rt.export.memory as mem
    import legion_rt.export.verify as vx

    if not fp64:  # as for a 7B LLM: no room for a float64 copy -> the RMS-scaled fallback rule
        monkeypatch.setattr(mem, "available_memory", lambda: 0)
    rule = "fp64_ratio" if fp64 else "rms_rtol"
    info = _llm_info(manifest)
    good = vx.verify_graphs(tiny_artifacts, tiny_model, info, seed=3)
    for c in good:
        print("\ncorrect:", c.line())
        assert c.rule == rule and c.ok, c.line()
    bad = vx.verify_graphs(_corrupt_copy(tiny_artifacts, tmp_path / "bad"), tiny_model, info, seed=3)
    for c in bad:
        print("corrupted:", c.line())
        assert c.rule == rule and not c.ok, c.line()
    assert next(tiny_model.parameters()).dtype == torch.float32  # the float64 pass cast the model back


def test_greedy_argmax_mismatch_fails(tiny_model, manifest, tiny_artifacts):
    """Logits within tolerance but a different greedy token (beyond a near-tie) fail the LLM check."""
    import legion_rt.export.verify as vx

    case = vx.llm_case(tiny_artifacts / "llm.onnx", _llm_info(manifest), tiny_model.llm, seed=0, steps=2)
    case.ref64 = {k: [a.copy() for a in v] for k, v in case.t32.items()}
    logits = case.ort["logits"][1].copy()
    second = int(np.argsort(logits)[-2])
    logits[second] = logits.max() + 1.0  # a clear (non-tie) flip of the argmax at step 1
    case.ort["logits"][1] = logits
    check = vx._judge(case, "fp64_ratio", 1.0)
    assert not check.argmax_ok and not check.ok and "2/3 identical" in check.argmax


# --------------------------------------------------------------------------------------- memory budget
def test_memory_estimate_counts_the_loaded_weights(tiny_paths, tiny_model):
    from legion_rt.export.memory import estimate_export_memory

    est = estimate_export_memory(tiny_paths.checkpoint, tiny_paths.clip, tiny_paths.detector)
    fp32 = 4 * sum(t.numel() for t in tiny_model.state_dict().values() if t.is_floating_point())
    assert est.model == fp32  # every loaded tensor, from the file headers only
    assert est.total > est.model
    est16 = estimate_export_memory(
        tiny_paths.checkpoint, tiny_paths.clip, tiny_paths.detector, precision="fp16"
    )
    noverify = estimate_export_memory(tiny_paths.checkpoint, tiny_paths.clip, verify=False)
    assert est16.total < est.total and noverify.total < est.total


def test_export_refuses_cleanly_when_memory_is_short(tmp_path, tiny_paths):
    from legion_rt.export.memory import estimate_export_memory

    out = tmp_path / "art"
    with pytest.raises(ExportError, match=r"needs about .* GB of memory .* only 0\.0 GB are available"):
        export_artifacts(checkpoint=tiny_paths.checkpoint, clip=tiny_paths.clip, out=out, progress=False,
                         memory_limit=1 << 20)  # fmt: skip
    assert not out.exists() and _leftovers(tmp_path, "art") == []
    # between the fp16 and the fp32 needs (the LLM streamed, as asked): the message names the option that fits
    kw = dict(stream_llm=True)
    need32 = estimate_export_memory(tiny_paths.checkpoint, tiny_paths.clip, **kw).total
    need16 = estimate_export_memory(tiny_paths.checkpoint, tiny_paths.clip, precision="fp16", **kw).total
    with pytest.raises(ExportError, match=r"--precision fp16 needs about"):
        export_artifacts(checkpoint=tiny_paths.checkpoint, clip=tiny_paths.clip, out=out, progress=False,
                         memory_limit=(need16 + need32) // 2, **kw)  # fmt: skip
    assert not out.exists()
    # too little for the LLM loaded in float32, enough streamed: the export streams it (the 7B on 24 GB)
    loaded = estimate_export_memory(tiny_paths.checkpoint, tiny_paths.clip).total
    assert need32 < loaded
    export_artifacts(checkpoint=tiny_paths.checkpoint, clip=tiny_paths.clip, out=out, progress=False,
                     memory_limit=loaded - 1)  # fmt: skip
    note = json.loads((out / "manifest.json").read_text())["verification"]["llm"]["note"]
    assert "(streamed LLM)" in note


def test_unsupported_llm_head_size_is_refused_before_any_work(tmp_path, tiny_paths):
    """ONNX Runtime's CPU GroupQueryAttention needs a head size that is a multiple of 16: a checkpoint with head
    size 8 is refused up front in one line, not at verification after the whole export."""
    import time

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in Path(tiny_paths.checkpoint).iterdir():
        (ckpt / f.name).symlink_to(f.resolve())
    (ckpt / "config.json").unlink()
    cfg = json.loads((Path(tiny_paths.checkpoint) / "config.json").read_text())
    assert cfg["hidden_size"] == 64
    cfg["num_attention_heads"] = cfg["num_key_value_heads"] = 8  # head size 8; the weight shapes still fit
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "art"
    t0 = time.perf_counter()
    with pytest.raises(ExportError) as info:
        export_artifacts(checkpoint=ckpt, clip=tiny_paths.clip, out=out, progress=False)
    assert time.perf_counter() - t0 < 5
    msg = str(info.value)
    assert "config.json: head size 8 is not a multiple of 16" in msg and "GroupQueryAttention" in msg
    assert "\n" not in msg
    assert not out.exists() and _leftovers(tmp_path, "art") == []


def test_float64_references_are_made_one_graph_at_a_time(tiny_model, manifest, tiny_artifacts, monkeypatch):
    """With room for the vision graph's float64 copy but not for SAM's (its global-attention scores are counted:
    a flat allowance let the 7B-shaped int4 export be killed for memory), vision is judged by fp64_ratio and the
    SAM graphs fall back to rms_rtol; the parts cast their own inputs, so a float64 CLIP beside a float32 SAM runs."""
    import legion_rt.export.memory as mem
    import legion_rt.export.verify as vx

    parts = dict(tiny_model.named_children())
    vision = vx._param_bytes([parts["clip"], parts["mm_projector"], parts["prediction_head"]], 4)
    sam = vx._param_bytes([parts["grounding_encoder"], parts["text_hidden_fcs"]], 4)
    assert vx.sam_attention_bytes(tiny_model.cfg) > vision + 2**20  # the attention term decides here
    monkeypatch.setattr(mem, "available_memory", lambda: vx.FP64_BASE_ACTIVATIONS + vision + sam + 2**20)
    checks = {c.name: c for c in vx.verify_graphs(tiny_artifacts, tiny_model, _llm_info(manifest), seed=1)}
    assert checks["vision"].rule == "fp64_ratio" and checks["vision"].ok
    for name in ("sam_encoder", "mask_head"):
        assert checks[name].rule == "rms_rtol" and checks[name].ok, checks[name].line()
    assert all(p.dtype == torch.float32 for p in tiny_model.parameters())
    from legion_rt.export.config import CONFIGS

    assert (
        vx.sam_attention_bytes(CONFIGS["legion-7b"]) == 4 * 16 * 4096**2 * 8
    )  # SAM ViT-H: 8.6 GB in float64


def test_external_data_gets_the_graph_files_mode(tmp_path, monkeypatch):
    """onnx writes a graph's external data file with mode 0600; an artifact directory must be readable by a service
    running as another user (found on the 7B-shaped export: sam_encoder.onnx.data was 0600)."""
    import stat

    from onnx import TensorProto, helper, numpy_helper

    import legion_rt.export.graphs as graphs

    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    proto = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], initializer=[w]))  # fmt: skip
    monkeypatch.setattr(graphs, "EXTERNAL_DATA_THRESHOLD", 0)  # as a graph past 2 GB
    old = os.umask(0o022)
    try:
        graphs.save_onnx(proto, tmp_path / "g.onnx")
    finally:
        os.umask(old)
    data = tmp_path / "g.onnx.data"
    assert data.is_file()
    assert stat.S_IMODE(data.stat().st_mode) == stat.S_IMODE((tmp_path / "g.onnx").stat().st_mode) == 0o644
