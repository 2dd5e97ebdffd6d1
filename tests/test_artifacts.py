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
    manifest = {
        "format": "legion_rt.artifacts",
        "format_version": 1,
        "model": {"hidden_size": 64},
        "tokens": {"eos": 2},
        "prompt": {"prefix_ids": [1], "suffix_ids": [2]},
        "preprocess": {},
        "graphs": {
            "vision": {"file": "vision.onnx"},
            "sam_encoder": {"file": "sam_encoder.onnx"},
            "mask_head": {"file": "mask_head.onnx"},
            "llm": {"file": "llm.onnx"},
        },
        "files": {n: {"sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)} for n, d in files.items()},
    }
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
    assert art.format_version == 1
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
    with pytest.raises(ArtifactError, match="required graph 'mask_head'"):
        load_artifacts(root)
    _make(root)
    _rewrite(root, lambda m: m["files"].pop("llm.onnx"))
    with pytest.raises(ArtifactError, match="'llm.onnx' is not listed"):
        load_artifacts(root)
    _make(root)
    _rewrite(root, lambda m: m.pop("prompt"))
    with pytest.raises(ArtifactError, match="section 'prompt'"):
        load_artifacts(root)
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"manifest\.json: not valid JSON"):
        load_artifacts(root)
    with pytest.raises(ArtifactError, match="verify="):
        load_artifacts(root, verify="fast")
