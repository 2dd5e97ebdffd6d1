"""export/checkpoint.py: round trips of the released layouts and refusal of bad checkpoints."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="export-stage tests need torch (pip install .[export])")

from legion_rt.errors import CheckpointError  # noqa: E402
from legion_rt.export.checkpoint import (  # noqa: E402
    directory_metadata,
    load_legion,
    read_legion_config,
    read_safetensors_header,
)

SHARD1 = "pytorch_model-00001-of-00002.bin"
SHARD2 = "pytorch_model-00002-of-00002.bin"
INDEX = "pytorch_model.bin.index.json"


def _bin(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _copy(tiny_paths, tmp_path: Path) -> tuple[Path, Path, Path]:
    ckpt = tmp_path / "checkpoint"
    clip = tmp_path / "clip"
    shutil.copytree(tiny_paths.checkpoint, ckpt)
    shutil.copytree(tiny_paths.clip, clip)
    det = tmp_path / "detector.bin"
    shutil.copyfile(tiny_paths.detector, det)
    return ckpt, clip, det


def _stored_tensors(tiny_paths) -> dict:
    state = {}
    for name in (SHARD1, SHARD2):
        state.update(_bin(tiny_paths.checkpoint / name))
    return state


def _assert_matches_files(model, tiny_paths, dtype):
    from safetensors.torch import load_file

    state = _stored_tensors(tiny_paths)
    sd = model.state_dict()
    # LLM, projector, text_hidden_fcs, SAM: every stored tensor, converted to dtype, exactly.
    for key, value in state.items():
        if key.endswith("rotary_emb.inv_freq") or key.startswith("model.region_encoder."):
            continue
        if key.startswith(("model.mm_projector.", "model.text_hidden_fcs.", "model.grounding_encoder.")):
            name = key[len("model.") :]
        else:
            name = "llm." + key
        assert sd[name].dtype == dtype, name
        assert torch.equal(sd[name], value.to(dtype)), name
    clip = load_file(str(tiny_paths.clip / "model.safetensors"))
    for name, value in sd.items():
        if name.startswith("clip."):
            assert torch.equal(value, clip["vision_model." + name[5:]].to(dtype)), name
    det = _bin(tiny_paths.detector)
    for key, value in det.items():
        assert torch.equal(sd[key], value.to(dtype)), key
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def test_tiny_round_trip_fp32(tiny_paths):
    model = load_legion(tiny_paths.checkpoint, tiny_paths.clip, tiny_paths.detector)
    _assert_matches_files(model, tiny_paths, torch.float32)
    cfg = model.cfg
    assert len(model.clip.encoder.layers) == cfg.clip_num_layers - 1  # the last layer is never needed
    assert model.prediction_head is not None
    # the rotary buffers are recomputed (the stored inv_freq copies were skipped)
    inv = model.llm.model.rotary_emb.inv_freq
    stored = _bin(tiny_paths.checkpoint / SHARD1)["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert torch.allclose(inv, stored, rtol=1e-6, atol=0)


def test_tiny_round_trip_bf16_and_no_detector(tiny_paths):
    model = load_legion(tiny_paths.checkpoint, tiny_paths.clip, dtype=torch.bfloat16)
    assert model.prediction_head is None
    state = _stored_tensors(tiny_paths)
    assert torch.equal(model.llm.lm_head.weight, state["lm_head.weight"])
    assert model.llm.lm_head.weight.dtype == torch.bfloat16
    patches, cls = model.clip_features(torch.zeros(1, 3, 336, 336))
    assert patches.dtype == torch.float32 and model.detect(cls) is None


@pytest.mark.slow
def test_small_round_trip(tmp_path):
    from legion_rt.export.tiny import make_tiny

    paths = make_tiny(tmp_path, seed=1, size="small")
    model = load_legion(paths.checkpoint, paths.clip, paths.detector)
    assert (model.cfg.hidden_size, model.cfg.num_layers, model.cfg.clip_hidden_size, model.cfg.sam_embed_dim) == (
        512, 6, 256, 128,
    )  # fmt: skip
    assert model.cfg.sam_global_attn_indexes == (1, 3)
    _assert_matches_files(model, paths, torch.float32)


def test_safetensors_layout_and_clip_bin_layout(tiny_paths, tmp_path):
    """The same weights as sharded safetensors + index, and CLIP as a CLIPVisionModel-layout pytorch_model.bin."""
    from safetensors.torch import load_file, save_file

    ckpt, clip, det = _copy(tiny_paths, tmp_path)
    index = json.loads((ckpt / INDEX).read_text())
    new_map = {}
    for i, name in enumerate((SHARD1, SHARD2), start=1):
        shard = _bin(ckpt / name)
        st_name = f"model-0000{i}-of-00002.safetensors"
        save_file(
            {k: v.contiguous() for k, v in shard.items()}, str(ckpt / st_name), metadata={"format": "pt"}
        )
        new_map.update({k: st_name for k in shard})
        (ckpt / name).unlink()
    (ckpt / INDEX).unlink()
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": index["metadata"], "weight_map": new_map})
    )
    vision = {
        k: v for k, v in load_file(str(clip / "model.safetensors")).items() if k.startswith("vision_model.")
    }
    (clip / "model.safetensors").unlink()
    torch.save(vision, clip / "pytorch_model.bin")
    cfg = json.loads((clip / "config.json").read_text())
    (clip / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", **cfg["vision_config"]}))

    a = load_legion(tiny_paths.checkpoint, tiny_paths.clip, tiny_paths.detector).state_dict()
    b = load_legion(ckpt, clip, det).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tensors_sharing_storage(tiny_paths, tmp_path):
    """Keys that share one storage (tied weights, views at offsets) load correctly even though the loader
    drops each source tensor's memory-mapped pages right after copying it (they are re-read from the file)."""
    ckpt, clip, _ = _copy(tiny_paths, tmp_path)
    s1, s2 = _bin(ckpt / SHARD1), _bin(ckpt / SHARD2)
    embed = s1["model.embed_tokens.weight"]
    s2.pop("lm_head.weight")
    s1["lm_head.weight"] = embed  # tied: the same storage under two keys
    both = torch.cat(
        [s1["model.layers.0.input_layernorm.weight"], s1["model.layers.0.post_attention_layernorm.weight"]]
    )
    s1["model.layers.0.input_layernorm.weight"] = both[:64]  # views into one storage, second at an offset
    s1["model.layers.0.post_attention_layernorm.weight"] = both[64:]
    torch.save(s1, ckpt / SHARD1)
    torch.save(s2, ckpt / SHARD2)
    _rewrite_index(ckpt, lambda m: m.__setitem__("lm_head.weight", SHARD1))
    for dtype in (torch.float32, torch.bfloat16):
        model = load_legion(ckpt, clip, dtype=dtype)
        assert torch.equal(model.llm.lm_head.weight, embed.to(dtype))
        assert torch.equal(model.llm.model.embed_tokens.weight, embed.to(dtype))
        layer = model.llm.model.layers[0]
        assert torch.equal(layer.post_attention_layernorm.weight, both[64:].to(dtype))
        assert torch.equal(layer.input_layernorm.weight, both[:64].to(dtype))
        assert model.llm.lm_head.weight.data_ptr() != model.llm.model.embed_tokens.weight.data_ptr()


def test_detector_inside_a_full_classifier_checkpoint(tiny_paths, tmp_path):
    det = _bin(tiny_paths.detector)
    full = {"base_model.model." + k: v for k, v in det.items()}
    full["base_model.model.lm_head.weight"] = torch.zeros(4, 4)
    full["base_model.model.model.embed_tokens.weight"] = torch.zeros(4, 4)
    path = tmp_path / "classifier.bin"
    torch.save({"state_dict": full}, path)
    model = load_legion(tiny_paths.checkpoint, tiny_paths.clip, path)
    assert torch.equal(model.prediction_head[2].bias, det["prediction_head.2.bias"].float())
    # Two complete heads under different prefixes are ambiguous.
    full.update({"other." + k: v for k, v in det.items()})
    torch.save(full, path)
    with pytest.raises(CheckpointError, match="several detector heads"):
        load_legion(tiny_paths.checkpoint, tiny_paths.clip, path)
    torch.save({"something.else": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="prediction_head"):
        load_legion(tiny_paths.checkpoint, tiny_paths.clip, path)


def test_detector_in_a_sharded_classifier_directory(tiny_paths, tmp_path):
    """A LegionForCls-style checkpoint directory: the head is found through the index, other shards unread."""
    from safetensors.torch import save_file

    det = _bin(tiny_paths.detector)
    d = tmp_path / "cls"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in det.items()}, str(d / "model-00002-of-00002.safetensors"))
    (d / "model-00001-of-00002.safetensors").write_bytes(b"not even a safetensors file")
    weight_map = {k: "model-00002-of-00002.safetensors" for k in det}
    weight_map["model.embed_tokens.weight"] = "model-00001-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = load_legion(tiny_paths.checkpoint, tiny_paths.clip, d)
    assert torch.equal(model.prediction_head[0].weight, det["prediction_head.0.weight"].float())


def test_metadata_and_config_without_reading_weights(tiny_paths):
    infos = directory_metadata(tiny_paths.checkpoint)
    assert any(k.startswith("model.region_encoder.") for k in infos)
    assert infos["lm_head.weight"].dtype == torch.bfloat16
    assert infos["lm_head.weight"].file.name == SHARD2
    cfg = read_legion_config(tiny_paths.checkpoint, tiny_paths.clip, infos)
    assert cfg.sam_embed_dim == 32 and cfg.sam_global_attn_indexes == (1,) and cfg.sam_window_size == 14
    assert cfg.name == "tiny" and cfg.vocab_size == 1007


# ---------------------------------------------------------------------------------------------------------------
# Bad checkpoints: every one is a CheckpointError naming the file and/or key


def _rewrite_shard(ckpt: Path, name: str, edit) -> None:
    shard = _bin(ckpt / name)
    edit(shard)
    torch.save(shard, ckpt / name)


def _rewrite_index(ckpt: Path, edit) -> None:
    index = json.loads((ckpt / INDEX).read_text())
    edit(index["weight_map"])
    (ckpt / INDEX).write_text(json.dumps(index))


def test_missing_shard(tiny_paths, tmp_path):
    ckpt, clip, _ = _copy(tiny_paths, tmp_path)
    (ckpt / SHARD2).unlink()
    with pytest.raises(CheckpointError, match=SHARD2.replace(".", r"\.")):
        load_legion(ckpt, clip)


def test_truncated_shard(tiny_paths, tmp_path):
    ckpt, clip, _ = _copy(tiny_paths, tmp_path)
    data = (ckpt / SHARD2).read_bytes()
    (ckpt / SHARD2).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=SHARD2.replace(".", r"\.")):
        load_legion(ckpt, clip)


def test_truncated_safetensors(tiny_paths, tmp_path):
    ckpt, clip, _ = _copy(tiny_paths, tmp_path)
    data = (clip / "model.safetensors").read_bytes()
    (clip / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors_header(clip / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_legion(ckpt, clip)
    (clip / "model.safetensors").write_bytes(b"\xff" * 8 + data[8:100])
    with pytest.raises(CheckpointError, match="header length"):
        load_legion(ckpt, clip)


def test_wrong_shape(tiny_paths, tmp_path):
    ckpt, clip, _ = _copy(tiny_paths, tmp_path)
    key = "model.grounding_encoder.mask_decoder.iou_token.weight"
    _rewrite_shard(ckpt, SHARD2, lambda s: s.__setitem__(key, torch.zeros(1, 128, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError, match=rf"{SHARD2}.*{key}.*\[1, 128\].*\[1, 256\]"):
        load_legion(ckpt, clip)


def test_wrong_llm_width_is_caught_by_shape(tiny_paths, tmp_path):
    ckpt, clip, _ = _copy(tiny_paths, tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mlp"):
        load_legion(ckpt, clip)


def test_unknown_key(tiny_paths, tmp_path):
    ckpt, clip, _ = _copy(tiny_paths, tmp_path)
    key = "model.some_new_head.weight"
    _rewrite_shard(ckpt, SHARD1, lambda s: s.__setitem__(key, torch.zeros(2, dtype=torch.bfloat16)))
    _rewrite_index(ckpt, lambda m: m.__setitem__(key, SHARD1))
    with pytest.raises(CheckpointError, match=rf"{SHARD1}.*unexpected tensor '{key}'"):
        load_legion(ckpt, clip)


def test_missing_key(tiny_paths, tmp_path):
    ckpt, clip, _ = _copy(tiny_paths, tmp_path)
    key = "model.text_hidden_fcs.0.2.bias"
    _rewrite_shard(ckpt, SHARD2, lambda s: s.pop(key))
    _rewrite_index(ckpt, lambda m: m.pop(key))
    with pytest.raises(CheckpointError, match=r"'model\.text_hidden_fcs\.0\.2\.bias' is missing"):
        load_legion(ckpt, clip)


def test_index_and_shard_disagree(tiny_paths, tmp_path):
    ckpt, clip, _ = _copy(tiny_paths, tmp_path)
    _rewrite_index(ckpt, lambda m: m.__setitem__("model.norm.weight", SHARD1))  # it is stored in shard 2
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        load_legion(ckpt, clip)
    ckpt2 = tmp_path / "c2"
    shutil.copytree(tiny_paths.checkpoint, ckpt2)
    _rewrite_index(ckpt2, lambda m: m.pop("model.norm.weight"))  # stored but not indexed
    with pytest.raises(CheckpointError, match="not listed in the index"):
        load_legion(ckpt2, clip)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_index_pointing_outside_the_directory(tiny_paths, tmp_path, kind):
    ckpt, clip, _ = _copy(tiny_paths, tmp_path)
    outside = tmp_path / "outside.bin"
    shutil.copyfile(ckpt / SHARD2, outside)
    if kind == "dotdot":
        name = "../outside.bin"
    elif kind == "absolute":
        name = str(outside)
    else:
        name = "link.bin"
        os.symlink(outside, ckpt / name)
    _rewrite_index(ckpt, lambda m: m.update({k: name for k, v in list(m.items()) if v == SHARD2}))
    (ckpt / SHARD2).unlink()
    with pytest.raises(CheckpointError, match="outside|not a plain relative path"):
        load_legion(ckpt, clip)


class _Payload:
    """Unpickling this calls open(target, 'w'): a file appears if the loader ever unpickles unsafely."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_is_refused(tiny_paths, tmp_path):
    ckpt, clip, _ = _copy(tiny_paths, tmp_path)
    # Control: the payload really creates its file when unpickled unsafely.
    control = tmp_path / "control.txt"
    torch.save({"x": _Payload(control)}, tmp_path / "control.bin")
    torch.load(tmp_path / "control.bin", weights_only=False)
    assert control.exists()

    target = tmp_path / "pwned.txt"
    state = _bin(ckpt / SHARD2)
    state["lm_head.weight"] = _Payload(target)
    torch.save(state, ckpt / SHARD2)
    with pytest.raises(CheckpointError, match=rf"{SHARD2}.*weights-only"):
        load_legion(ckpt, clip)
    assert not target.exists()
    # The same as a detector file.
    torch.save({"prediction_head.0.weight": _Payload(target)}, tmp_path / "det.bin")
    with pytest.raises(CheckpointError, match="det.bin"):
        load_legion(tiny_paths.checkpoint, tiny_paths.clip, tmp_path / "det.bin")
    assert not target.exists()


def test_missing_config_and_clip_weights(tiny_paths, tmp_path):
    ckpt, clip, _ = _copy(tiny_paths, tmp_path)
    (clip / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_legion(ckpt, clip)
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_legion(ckpt, tiny_paths.clip)


def test_clip_missing_a_needed_layer(tiny_paths, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt, clip, _ = _copy(tiny_paths, tmp_path)
    state = load_file(str(clip / "model.safetensors"))
    dropped = {k: v for k, v in state.items() if not k.startswith("vision_model.encoder.layers.1.")}
    save_file(dropped, str(clip / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"clip.*'vision_model\.encoder\.layers\.1\..*' is missing"):
        load_legion(ckpt, clip)
