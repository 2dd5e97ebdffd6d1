"""export/tiny/full.py, the streamed writer of make-tiny --size full, at sizes CI affords: the same code writes the
7B-shaped checkpoint (tests/test_full_size.py runs that one, outside CI)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from legion_rt.errors import LegionError

pytest.importorskip("transformers")

from legion_rt.export.checkpoint import load_legion  # noqa: E402
from legion_rt.export.config import CONFIGS  # noqa: E402
from legion_rt.export.tiny.full import (  # noqa: E402
    _checkpoint_specs,
    _template,
    check_disk,
    full_checkpoint_bytes,
    make_full,
    shard_plan,
    write_streamed_shards,
)

from .test_tiny import _check_language  # noqa: E402


def test_streamed_shards_equal_torch_save(tmp_path):
    """The skip_data + shared-mmap fill gives files torch.load reads (weights_only) with exactly the tensors."""
    g = torch.Generator().manual_seed(0)
    state = {
        "a": torch.randn(300, 70, generator=g).bfloat16(),
        "b.inv_freq": torch.rand(17, generator=g),
        "c": torch.randn(5000, generator=g).bfloat16(),
        "d": torch.randn(3, 4, 5, generator=g).bfloat16(),
    }
    specs = [(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    # 300*70*2 = 42000 bytes: "a" alone, then b + c (68 + 10000), then d
    files = write_streamed_shards(tmp_path, specs, iter(state.items()), max_shard_bytes=42000)
    assert [f.name for f in files] == [f"pytorch_model-0000{k}-of-00002.bin" for k in (1, 2)]
    index = json.loads((tmp_path / "pytorch_model.bin.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
    loaded = {}
    for f in files:
        part = torch.load(f, weights_only=True)
        assert all(index["weight_map"][k] == f.name for k in part)
        loaded.update(part)
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


def test_streamed_shards_refuse_wrong_tensors(tmp_path):
    specs = [("a", (2, 3), torch.bfloat16), ("b", (4,), torch.bfloat16)]
    with pytest.raises(LegionError, match="shape"):
        write_streamed_shards(tmp_path, specs, iter([("a", torch.zeros(3, 2))]))
    with pytest.raises(LegionError, match="never written: \\['b'\\]"):
        write_streamed_shards(tmp_path, specs, iter([("a", torch.zeros(2, 3))]))
    with pytest.raises(LegionError, match="unexpected"):
        write_streamed_shards(tmp_path, specs, iter([("z", torch.zeros(2, 3))]))


def test_shard_plan_is_transformers_rule():
    b = torch.bfloat16
    specs = [("x", (10,), b), ("y", (10,), b), ("big", (100,), b), ("z", (1,), b)]
    assert shard_plan(specs, 40) == [["x", "y"], ["big"], ["z"]]
    assert shard_plan(specs, 10**6) == [["x", "y", "big", "z"]]


def test_full_size_plan_matches_the_released_layout():
    """The 7B-shaped checkpoint as planned from shapes alone (nothing allocated): LLaMA-7B + SAM ViT-H in bf16,
    in two shards of at most 10 GB, vocab 32007."""
    cfg = CONFIGS["legion-7b"].replace(vocab_size=32007)
    specs = _checkpoint_specs(cfg, _template(cfg.replace(num_layers=1), meta=True), num_layers=32)
    shapes = dict((k, s) for k, s, _ in specs)
    assert shapes["model.embed_tokens.weight"] == (32007, 4096) == shapes["lm_head.weight"]
    assert shapes["model.layers.31.mlp.down_proj.weight"] == (4096, 11008)
    assert shapes["model.grounding_encoder.image_encoder.blocks.31.attn.rel_pos_h"] == (127, 80)
    llm = sum(math.prod(s) for k, s, _ in specs if k.startswith(("model.layers.", "model.embed", "model.norm", "lm_head"))
              and not k.endswith("inv_freq"))  # fmt: skip
    sam = sum(math.prod(s) for k, s, _ in specs if k.startswith("model.grounding_encoder.image_encoder."))
    assert 6.73e9 < llm < 6.75e9  # LLaMA-7B with vocab 32007
    assert 6.3e8 < sam < 6.4e8  # SAM ViT-H's image encoder: 632M parameters
    plan = shard_plan(specs, 10 * 10**9)
    assert len(plan) == 2 and plan[1][-1] == "lm_head.weight"
    total = full_checkpoint_bytes(cfg)
    assert 14.5e9 < total < 17e9, total


def test_disk_check_names_the_path(tmp_path):
    with pytest.raises(LegionError, match=str(tmp_path / "x") + ".*needs about"):
        check_disk(tmp_path / "x", 10**18, "make-tiny --size full")


@pytest.mark.slow
def test_streamed_tiny_loads_and_plays_the_loop(tmp_path):
    """make_full's code on the tiny registry entry (2 decoder layers, layer 1 drawn in the template), small shards:
    the strict loader takes every tensor, the planted language plays out (phrases, masks, EOS where planned)."""
    paths = make_full(tmp_path, seed=3, size="tiny", pieces=1000, max_shard_bytes=2 * 10**6)
    shards = sorted(paths.checkpoint.glob("pytorch_model-*.bin"))
    assert len(shards) > 2
    model = load_legion(paths.checkpoint, paths.clip, paths.detector)
    layers = model.llm.model.layers
    assert not torch.equal(layers[0].mlp.up_proj.weight, layers[1].mlp.up_proj.weight)
    _check_language(paths)


def test_full_size_refuses_a_small_disk_before_writing(tmp_path, monkeypatch):
    """make_tiny(size="full") checks free disk against the planned bytes first: one LegionError naming the path and
    both sizes, nothing written (a 16 GB checkpoint must not fail half-way on a full disk)."""
    import shutil

    from legion_rt.export.tiny import make_tiny

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10 * 10**9))
    with pytest.raises(
        LegionError, match=r"make-tiny --size full needs about 1[5-7]\.\d GB of disk, only 10\.0 GB"
    ):
        make_tiny(tmp_path / "full", size="full")
    assert not (tmp_path / "full").exists()
