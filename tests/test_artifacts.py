"""legion_rt.artifacts on a synthetic artifact directory (no export needed): every way a directory can be bad is
an ArtifactError naming the file. The same checks on a real exported directory are in tests/test_engine.py."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from legion_rt.artifacts import load_artifacts, sha256_file
from legion_rt.errors import ArtifactError

FILES = {
    "vision.onnx": b"vision graph bytes",
    "sam_encoder.onnx": b"sam graph",
    "mask_head.onnx": b"mask head",
    "llm.onnx": b"llm graph",
    "llm.onnx.data": os.urandom(5 * 1024 * 1024 + 7),  # > one hashing chunk
    "embed_tokens.npy": b"table",
    "tokenizer.json": b"{}",
}


def _make(root, files=FILES, **overrides):
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    graph = {"inputs": ["x"], "outputs": ["y"], "precision": "fp32", "exporter": "dynamo"}
    manifest = {
        "format": "legion_rt.artifacts",
        "format_version": 2,
        "precision": "fp32",
        "model": {
            "name": "tiny", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "head_dim": 16,
            "intermediate_size": 128, "vocab_size": 1007, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "clip_hidden_size": 64, "num_image_tokens": 576, "sam_embed_dim": 256,
            "sam_embedding_hw": [64, 64], "low_res_hw": [256, 256],
        },
        "tokens": {"bos": 1, "eos": 2, "unk": 0, "pad": 0, "im_start": 1000, "im_end": 1001, "bbox": 1002,
                   "point": 1003, "seg": 1004, "p_start": 1005, "p_end": 1006},
        "prompt": {"prefix_ids": [1, 5, 1000], "suffix_ids": [1001, 7]},
        "preprocess": {"clip": {"size": 336, "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]},
                       "sam": {"size": 1024, "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}},
        "detector": True,
        "graphs": {
            "vision": {"file": "vision.onnx", **graph},
            "sam_encoder": {"file": "sam_encoder.onnx", **graph},
            "mask_head": {"file": "mask_head.onnx", **graph},
            "llm": {"file": "llm.onnx", **graph, "kind": "gqa_shared_kv", "kv_dtype": "float32"},
        },
        "files": {n: {"sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)} for n, d in files.items()},
    }  # fmt: skip
    manifest.update(overrides)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def _rewrite(root, fn):
    m = json.loads((root / "manifest.json").read_text())
    fn(m)
    (root / "manifest.json").write_text(json.dumps(m))


def test_good_directory(tmp_path):
    _make(tmp_path / "art")
    art = load_artifacts(tmp_path / "art")
    assert art.manifest.format_version == 2 and art.manifest.model.hidden_size == 64
    assert art.manifest.prompt.prefix_ids == (1, 5, 1000) and art.manifest.graphs.llm.kv_dtype == "float32"
    assert art.graph_path("llm") == tmp_path / "art" / "llm.onnx"
    assert sha256_file(art.path("llm.onnx.data")) == hashlib.sha256(FILES["llm.onnx.data"]).hexdigest()
    for mode in ("size", "none"):
        load_artifacts(tmp_path / "art", verify=mode)


def test_flipped_byte_named(tmp_path):
    root = tmp_path / "art"
    _make(root)
    data = bytearray(FILES["llm.onnx.data"])
    data[3 * 1024 * 1024] ^= 0x01  # a byte in the middle of the second hashing chunk
    (root / "llm.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"llm\.onnx\.data: sha256 mismatch"):
        load_artifacts(root)
    load_artifacts(root, verify="size")  # same size: only the full check sees it


def test_truncated_and_missing(tmp_path):
    root = tmp_path / "art"
    _make(root)
    (root / "vision.onnx").write_bytes(b"vision")
    with pytest.raises(ArtifactError, match=r"vision\.onnx: size 6 bytes"):
        load_artifacts(root, verify="size")
    _make(root)
    (root / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match=r"tokenizer\.json: listed in the manifest but missing"):
        load_artifacts(root)
    with pytest.raises(ArtifactError, match=r"manifest\.json: missing"):
        load_artifacts(tmp_path)
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        load_artifacts(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/passwd", "a/../../outside.bin", "sub\\..\\x"])
def test_paths_outside(tmp_path, name):
    root = tmp_path / "art"
    _make(root)
    (tmp_path / "outside.bin").write_bytes(b"x")
    _rewrite(root, lambda m: m["files"].update({name: {"sha256": "0" * 64, "bytes": 1}}))
    with pytest.raises(ArtifactError, match="leaves the artifact directory|not a relative path"):
        load_artifacts(root)


def test_symlink_escaping(tmp_path):
    root = tmp_path / "art"
    _make(root)
    (tmp_path / "outside.bin").write_bytes(FILES["mask_head.onnx"])
    (root / "mask_head.onnx").unlink()
    (root / "mask_head.onnx").symlink_to(tmp_path / "outside.bin")
    with pytest.raises(ArtifactError, match=r"mask_head\.onnx: resolves outside"):
        load_artifacts(root)


def test_format_and_sections(tmp_path):
    root = tmp_path / "art"
    _make(root, format_version=99)
    with pytest.raises(ArtifactError, match="unknown format_version 99"):
        load_artifacts(root)
    _make(root, format="something.else")
    with pytest.raises(ArtifactError, match="format is 'something.else'"):
        load_artifacts(root)
    _make(root)
    _rewrite(root, lambda m: m["graphs"].pop("mask_head"))
    with pytest.raises(ArtifactError, match="graphs.mask_head: missing"):
        load_artifacts(root)
    _make(root)
    _rewrite(root, lambda m: m["files"].pop("llm.onnx"))
    with pytest.raises(ArtifactError, match="'llm.onnx' is not listed"):
        load_artifacts(root)
    _make(root)
    _rewrite(root, lambda m: m.pop("prompt"))
    with pytest.raises(ArtifactError, match="manifest.json: prompt: missing"):
        load_artifacts(root)
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"manifest\.json: not valid JSON"):
        load_artifacts(root)
    with pytest.raises(ArtifactError, match="verify="):
        load_artifacts(root, verify="fast")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["tokens"].update(eos=True), r"tokens\.eos: expected an integer, got True"),
        (lambda m: m["model"].update(hidden_size="64"), r"model\.hidden_size: expected an integer"),
        (
            lambda m: m["prompt"].update(suffix_ids=[1001, 2.0]),
            r"prompt\.suffix_ids\[1\]: expected an integer",
        ),
        (
            lambda m: m["prompt"].update(prefix_ids=[1, -3]),
            r"prompt\.prefix_ids: token id -3 outside \[0, 1007\)",
        ),
        (lambda m: m["tokens"].update(seg=1007), r"tokens: token id 1007 outside"),
        (
            lambda m: m["preprocess"]["clip"].update(mean=[0.5, 0.5]),
            r"preprocess\.clip\.mean: expected a list of 3",
        ),
        (lambda m: m["graphs"]["llm"].update(kind="other"), r"graphs\.llm\.kind: 'other' is not supported"),
        (lambda m: m["graphs"]["llm"].update(kv_dtype="bfloat16"), r"graphs\.llm\.kv_dtype"),
        (lambda m: m["graphs"]["vision"].update(precision="fp8"), r"graphs\.vision\.precision: 'fp8'"),
        (lambda m: m.update(detector="yes"), r"detector: expected true or false"),
        (lambda m: m["model"].update(num_kv_heads=3), r"model\.num_kv_heads: 3 does not divide num_heads 4"),
        (
            lambda m: m["model"].update(max_position_embeddings=500),
            r"max_position_embeddings: 500 leaves no room",
        ),
        (lambda m: m["files"]["llm.onnx"].update(bytes=-1), r"files\.llm\.onnx\.bytes: must be >= 0"),
        (lambda m: m["files"]["llm.onnx"].pop("sha256"), r"files\.llm\.onnx\.sha256: missing"),
        (lambda m: m.update(format_version=1), r"unknown format_version 1 .*re-export"),
    ],
)
def test_typed_manifest_names_the_key(tmp_path, edit, message):
    """Every field is type-checked once, at load, with one line naming the key (a bool is not an id)."""
    root = tmp_path / "art"
    _make(root)
    _rewrite(root, edit)
    with pytest.raises(ArtifactError, match=message) as err:
        load_artifacts(root)
    assert "\n" not in str(err.value) and "manifest.json" in str(err.value)


def test_manifest_round_trip(tmp_path):
    """Parsing keeps every value it was given and adds only the format's defaults; writing what was parsed and
    parsing it again changes nothing."""
    from legion_rt.manifest import Manifest

    doc = _make(tmp_path / "art")
    out = Manifest.from_json(json.loads(json.dumps(doc))).to_json()

    def subset(a, b, key=""):
        if isinstance(a, dict):
            for k, v in a.items():
                assert k in b, f"{key}.{k} dropped"
                subset(v, b[k], f"{key}.{k}")
        else:
            assert a == b, key

    subset(doc, out)
    assert set(out) - set(doc) == {"producer", "verification"}
    assert set(out["graphs"]["llm"]) - set(doc["graphs"]["llm"]) >= {"past_key", "seqlens_k", "external_data"}
    assert Manifest.from_json(out).to_json() == out
