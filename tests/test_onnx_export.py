"""export/onnx_export.py: every graph of the tiny artifact directory against PyTorch, the LLM runner over the
exported artifact against eager transformers, the manifest, and the all-or-nothing artifact directory."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="export-stage tests need torch (pip install .[export])")
ort = pytest.importorskip("onnxruntime", reason="the runtime needs onnxruntime")

from export.onnx_export import TOLERANCES, ExportError, export_artifacts  # noqa: E402
from legion_rt.backends.ort_llm import OrtLLM  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tiny_paths):
    from export.checkpoint import load_legion

    return load_legion(tiny_paths.checkpoint, tiny_paths.clip, detector=tiny_paths.detector).float().eval()


@pytest.fixture(scope="module")
def manifest(tiny_artifacts):
    return json.loads((tiny_artifacts / "manifest.json").read_text())


def _session(art: Path, name: str):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(art / name), opts, providers=["CPUExecutionProvider"])


def _check(name: str, got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, (name, got.shape, want.shape)
    err = float(np.abs(got - want).max())
    limit = TOLERANCES[name].limit(float(np.abs(want).max()))
    print(f"\n{name}: max abs err {err:.3g} (limit {limit:.3g})")
    assert err <= limit, f"{name}: {err} > {limit}"
    return err


# ---------------------------------------------------------------------------------------------- the manifest
def test_manifest_fields(manifest, tiny_paths, tiny_model):
    cfg = tiny_model.cfg
    assert manifest["format"] == "legion_rt.artifacts" and manifest["format_version"] == 1
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
    from export.tokenizer import prompt_ids

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
        and llm["num_layers"] == cfg.num_layers
    )
    assert manifest["graphs"]["vision"]["outputs"] == ["image_embeds", "cls_logits"]
    assert set(manifest["verification"]) == {"vision", "sam_encoder", "mask_head", "llm"}


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

    runner = OrtLLM(tiny_artifacts / "llm.onnx", manifest, threads=1)
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
    for _ in range(steps):
        with torch.no_grad():
            out = llm(inputs_embeds=x, cache=ref_cache, use_cache=True, output_hidden_states=True)
        ref_cache = out.cache
        ref_l, ref_h = out.logits[0, -1].numpy(), out.hidden_states[-1][0, -1].numpy()
        err_l = max(err_l, float(np.abs(logits - ref_l).max()))
        err_h = max(err_h, float(np.abs(hidden - ref_h).max()))
        mag_l, mag_h = max(mag_l, float(np.abs(ref_l).max())), max(mag_h, float(np.abs(ref_h).max()))
        tokens.append(int(np.argmax(logits)))
        ref_tokens.append(int(np.argmax(ref_l)))
        x = torch.from_numpy(table[ref_tokens[-1]][None, None])
        logits, hidden = runner.forward(cache, table[tokens[-1]][None, None])
    print(
        f"\nllm artifact, prefill {cache.length - steps} + {steps} steps: logits err {err_l:.3g} (|max| {mag_l:.3g}), "
        f"hidden {err_h:.3g} (|max| {mag_h:.3g})"
    )
    assert tokens == ref_tokens
    # Measured (tiny, seed 0): logits 2.0e-3 on logits of magnitude ~1e3 (make_tiny plants large margins),
    # hidden 7.2e-6; the graph tolerance (atol + rtol * magnitude) applies.
    assert err_l <= TOLERANCES["llm"].limit(mag_l) and err_h <= TOLERANCES["llm"].limit(mag_h)


# ---------------------------------------------------------------------------------------- all-or-nothing
def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_failed_export_leaves_no_directory(tmp_path, tiny_paths, monkeypatch):
    import export.onnx_export as ox

    def broken_export(module, args, path, **kwargs):
        path.write_bytes(b"half a graph")  # something was already written into the temporary directory
        raise ExportError(f"simulated failure while exporting {path.name}")

    monkeypatch.setattr(ox, "_torch_export", broken_export)
    out = tmp_path / "art"
    with pytest.raises(ExportError, match="simulated"):
        export_artifacts(checkpoint=tiny_paths.checkpoint, clip=tiny_paths.clip, out=out, progress=False)
    assert not out.exists()
    assert _leftovers(tmp_path, "art") == []


def test_out_of_tolerance_aborts_and_keeps_the_old_directory(
    tmp_path, tiny_paths, tiny_artifacts, monkeypatch
):
    import shutil

    import export.onnx_export as ox

    out = tmp_path / "art"
    shutil.copytree(tiny_artifacts, out)
    before = (out / "manifest.json").read_bytes()
    # zero tolerance: the (measured, nonzero) rounding differences of the vision graph now fail the export
    monkeypatch.setitem(ox.TOLERANCES, "vision", ox.Tolerance(atol=0.0, rtol=0.0))
    with pytest.raises(ExportError, match=r"vision\.onnx: ONNX Runtime differs from PyTorch"):
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
    import export.onnx_export as ox
    import export.onnx_llm as ol

    monkeypatch.setattr(ol, "EXTERNAL_DATA_THRESHOLD", 0)
    monkeypatch.setattr(ox, "EXTERNAL_DATA_THRESHOLD", 0)
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
    runner = OrtLLM(out / "llm.onnx", manifest, threads=1)
    cache = runner.new_cache(8)
    logits, hidden = runner.forward(cache, np.zeros((1, 3, manifest["model"]["hidden_size"]), np.float32))
    assert logits.dtype == np.float32 and np.isfinite(logits).all() and cache.keys[0].dtype == np.float16
