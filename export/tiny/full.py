"""make-tiny --size full: a random-weight LEGION of the released shapes (the ``legion-7b`` registry entry: LLaMA-7B
with vocab 32007, SAM ViT-H, CLIP ViT-L/14-336), written tensor by tensor so that the LLM is never in memory.

    out/checkpoint/  config.json, pytorch_model-0000K-of-0000N.bin + pytorch_model.bin.index.json (bf16, sharded
                     like transformers' save_pretrained with its default max_shard_size of 10 GB: 2 shards),
                     tokenizer files (the tiny tokenizer grown to 32000 pieces: the added tokens at 32000..32006)
    out/clip/        full CLIPModel-style directory (ViT-L/14-336 vision tower in fp32, a few text keys)
    out/detector.bin

How the LLM is streamed: every part except the LLM's decoder layers is built at full size in fp32 (a LegionModel
with one decoder layer: SAM ViT-H, the truncated CLIP tower, projector, text projection, embeddings and lm_head,
about 5.7 GB), and planted with the loop language of loop.py (a fixed cycle of words with <p>, </p> and [SEG], EOS
at about token 72; its planting is analytic: no forward pass, so the 7B is never needed in memory). Decoder layer 0
is that model's planted layer; layers 1..31 are drawn one at a time into the same module (random_layer with the
loop scales, a generator per layer) and written. The shards are laid out first with torch.save over fake tensors
and ``torch.serialization.skip_data`` (the file's records exist, the tensor bytes are holes), then filled in place
through a shared memory map: at most one decoder layer is ever resident beyond the 1-layer model.

Why the loop language and not free.py's: the free language is calibrated on a forward pass of the whole model
(logit scale, the counter value at EOS), which would need all 7B weights in memory and minutes of CPU time.
"""

from __future__ import annotations

import math
import mmap
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from legion_rt.errors import LegionError

from ..config import CONFIGS, LegionConfig
from .configs import (
    checkpoint_config_json,
    clip_config_json,
    clip_preprocessor_json,
    generation_config_json,
    write_json,
)
from .loop import CYCLE_WORDS, LAYER_SCALES, plant_loop_language
from .planting import cycle_words, random_layer
from .sam import randomize_sam
from .weights import _region_encoder_tensors, _to_ckpt_key, write_clip_weights, write_detector

FULL_SIZE = "legion-7b"
LLAMA_PIECES = 32000  # sentencepiece pieces of the released LLaMA tokenizer (added tokens from 32000)
MAX_SHARD_BYTES = 10 * 10**9  # transformers save_pretrained's default max_shard_size "10GB"
GB = 10**9


def full_checkpoint_bytes(cfg: LegionConfig) -> int:
    """Bytes the written checkpoint directory + CLIP directory take (from the shapes, before writing)."""
    specs = _checkpoint_specs(cfg, _template(cfg.replace(num_layers=1), meta=True), num_layers=cfg.num_layers)
    ckpt = sum(math.prod(shape) * _itemsize(dtype) for _, shape, dtype in specs)
    clip = 4 * _clip_tower_params(cfg)
    return ckpt + clip


def check_disk(path: Path, need: int, what: str) -> None:
    """LegionError (one line) when the file system holding ``path`` has less than ``need`` bytes free."""
    probe = Path(path)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise LegionError(
            f"{path}: {what} needs about {need / GB:.1f} GB of disk, only {free / GB:.1f} GB free there"
        )


def make_full(out_dir, *, seed: int = 0, size: str = FULL_SIZE, pieces: int = LLAMA_PIECES,
              max_shard_bytes: int = MAX_SHARD_BYTES, bar=None):  # fmt: skip
    """Write the streamed random-weight checkpoint (module docstring) into ``out_dir``; returns TinyPaths.

    ``size``/``pieces``/``max_shard_bytes`` exist for tests (a small registry entry, the same code path)."""
    from ..progress import Progress
    from ..tokenizer import prompt_ids, write_tiny_tokenizer
    from . import TinyPaths

    out = Path(out_dir)
    cfg = CONFIGS[size].replace(vocab_size=pieces + 7, name=size)
    label = "full" if size == FULL_SIZE else size
    check_disk(out, int(full_checkpoint_bytes(cfg) * 1.05) + GB, f"make-tiny --size {label}")
    ckpt, clip_dir = out / "checkpoint", out / "clip"
    for d in (ckpt, clip_dir):
        d.mkdir(parents=True, exist_ok=True)
        for stale in [*d.glob("*.bin"), *d.glob("*.safetensors"), *d.glob("*.index.json")]:
            stale.unlink()
    vocab = write_tiny_tokenizer(ckpt, pieces=pieces)
    if vocab != cfg.vocab_size:  # pragma: no cover - the tokenizer's added tokens are fixed
        raise LegionError(f"tokenizer vocab {vocab} != {cfg.vocab_size}")
    prefix, suffix = prompt_ids(ckpt)
    prompt_len = len(prefix) + cfg.num_image_tokens + len(suffix)
    bar = bar or Progress(True, 3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        with bar.step("build the non-LLM parts at full size (fp32) and plant the loop language"):
            model = _template(cfg.replace(num_layers=1))
            randomize_sam(model, gen)
            words = cycle_words(ckpt, set(prefix + suffix), seed, CYCLE_WORDS)
            plan = plant_loop_language(model, cfg, prompt_len, words)
        with bar.step(f"write {cfg.num_layers} decoder layers + the rest, tensor by tensor (bf16 shards)"):
            specs = _checkpoint_specs(cfg, model, num_layers=cfg.num_layers)
            tensors = _checkpoint_tensors(cfg, model, plan["planted"], seed, gen)
            write_streamed_shards(ckpt, specs, tensors, max_shard_bytes=max_shard_bytes)
        write_json(ckpt / "config.json", checkpoint_config_json(cfg))
        write_json(ckpt / "generation_config.json", generation_config_json())
        with bar.step("write the CLIP directory (fp32) and the detector"):
            write_clip_weights(clip_dir, model, cfg, seed, gen)
            write_json(clip_dir / "config.json", clip_config_json(cfg))
            write_json(clip_dir / "preprocessor_config.json", clip_preprocessor_json(cfg))
            detector = out / "detector.bin"
            write_detector(detector, model)
    write_json(
        out / "tiny_info.json", {"seed": seed, "size": size, "steer": "loop", "streamed": True, **plan}
    )
    return TinyPaths(checkpoint=ckpt, clip=clip_dir, detector=detector)


# ---------------------------------------------------------------------------------------------------------------
def _template(cfg: LegionConfig, meta: bool = False):
    """A LegionModel of ``cfg`` (one decoder layer when called by make_full), fp32, on the meta device if asked."""
    from ..model.legion import LegionModel

    if meta:
        with torch.device("meta"):
            return LegionModel(cfg, with_detector=True)
    return LegionModel(cfg, with_detector=True)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _clip_tower_params(cfg: LegionConfig) -> int:
    h, i, n = cfg.clip_hidden_size, cfg.clip_intermediate_size, cfg.clip_num_layers
    return n * (4 * h * h + 2 * h * i + 9 * h + i) + (cfg.num_image_tokens + 1) * h + 3 * 14 * 14 * h + 6 * h


def _layer_keys(model) -> list[tuple[str, tuple[int, ...]]]:
    layer = model.llm.model.layers[0]
    return [(name, tuple(t.shape)) for name, t in layer.state_dict().items()]


def _checkpoint_specs(cfg: LegionConfig, model, *, num_layers: int) -> list[tuple[str, tuple, torch.dtype]]:
    """(checkpoint key, shape, dtype) of every stored tensor, in the released order: embeddings, decoder layers
    (with their rotary inv_freq buffers), norm, the LEGION heads and SAM, the region encoder, lm_head."""
    bf16 = torch.bfloat16
    specs = [("model.embed_tokens.weight", tuple(model.llm.model.embed_tokens.weight.shape), bf16)]
    for i in range(num_layers):
        specs += [(f"model.layers.{i}.{name}", shape, bf16) for name, shape in _layer_keys(model)]
        specs.append((f"model.layers.{i}.self_attn.rotary_emb.inv_freq", (cfg.head_dim // 2,), torch.float32))
    specs.append(("model.norm.weight", tuple(model.llm.model.norm.weight.shape), bf16))
    for name, t in model.state_dict().items():
        key = _to_ckpt_key(name)
        if key is not None and not name.startswith("llm."):
            specs.append((key, tuple(t.shape), bf16))
    specs += [(k, tuple(v.shape), bf16) for k, v in _region_encoder_tensors(torch.Generator()).items()]
    specs.append(("lm_head.weight", tuple(model.llm.lm_head.weight.shape), bf16))
    return specs


def _checkpoint_tensors(
    cfg: LegionConfig, model, planted, seed: int, gen
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of _checkpoint_specs, in that order. Decoder layer i > 0 is drawn into the template's one layer
    (generator seeded by (seed, i)), so one layer's weights exist at a time."""
    inv_freq = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    )
    llm = model.llm
    yield "model.embed_tokens.weight", llm.model.embed_tokens.weight
    layer = llm.model.layers[0]
    for i in range(cfg.num_layers):
        if i > 0:
            layer_gen = torch.Generator().manual_seed(1_000_003 * (seed + 1) + i)
            random_layer(layer, cfg.hidden_size, layer_gen, planted, **LAYER_SCALES)
        for name, t in layer.state_dict().items():
            yield f"model.layers.{i}.{name}", t
        yield f"model.layers.{i}.self_attn.rotary_emb.inv_freq", inv_freq
    yield "model.norm.weight", llm.model.norm.weight
    for name, t in model.state_dict().items():
        key = _to_ckpt_key(name)
        if key is not None and not name.startswith("llm."):
            yield key, t
    yield from _region_encoder_tensors(gen).items()
    yield "lm_head.weight", llm.lm_head.weight


def shard_plan(specs, max_shard_bytes: int) -> list[list[str]]:
    """Keys per shard by transformers' rule: in order, a new shard starts when the next tensor would pass
    ``max_shard_bytes`` (a tensor larger than that gets a shard of its own)."""
    shards, size = [[]], 0
    for key, shape, dtype in specs:
        n = math.prod(shape) * _itemsize(dtype)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    return shards


def write_streamed_shards(
    ckpt: Path, specs, tensors, *, max_shard_bytes: int = MAX_SHARD_BYTES
) -> list[Path]:
    """Write ``pytorch_model-0000K-of-0000N.bin`` + ``pytorch_model.bin.index.json`` from ``tensors`` (an iterator
    of (key, tensor) in the order of ``specs``: (key, shape, dtype)) without holding a shard in memory.

    Each shard is torch.save'd over fake tensors under ``torch.serialization.skip_data`` (records and space, no
    bytes), mapped back with ``torch.load(mmap=True, weights_only=True)`` as a shared mapping, and filled tensor by
    tensor (converted to the stored dtype); the pages of a filled tensor are released at once."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..checkpoint import _drop_pages

    plan = shard_plan(specs, max_shard_bytes)
    n = len(plan)
    names = [f"pytorch_model-{k + 1:05d}-of-{n:05d}.bin" for k in range(n)]
    spec_of = {key: (shape, dtype) for key, shape, dtype in specs}
    where = {}
    for name, keys in zip(names, plan, strict=True):
        with FakeTensorMode():
            fake = {k: torch.empty(spec_of[k][0], dtype=spec_of[k][1]) for k in keys}
        with torch.serialization.skip_data(materialize_fake_tensors=True):
            torch.save(fake, ckpt / name)
        where.update({k: name for k in keys})
    torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)
    try:
        maps = {name: torch.load(ckpt / name, mmap=True, weights_only=True) for name in names}
    finally:
        torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE)
    seen = set()
    for key, t in tensors:
        if key not in where or key in seen:
            raise LegionError(f"streamed checkpoint: unexpected or repeated tensor {key}")
        dst = maps[where[key]][key]
        if tuple(t.shape) != tuple(dst.shape):
            raise LegionError(
                f"streamed checkpoint: {key} has shape {tuple(t.shape)}, planned {tuple(dst.shape)}"
            )
        dst.copy_(t)
        _drop_pages(dst)  # shared mapping: the written bytes stay in the page cache and go to the file
        seen.add(key)
    missing = [k for k in where if k not in seen]
    if missing:
        raise LegionError(f"streamed checkpoint: tensors never written: {missing[:3]}")
    del maps
    total = sum(math.prod(s) * _itemsize(d) for _, s, d in specs)
    write_json(ckpt / "pytorch_model.bin.index.json",
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(where.items()))})  # fmt: skip
    return [ckpt / name for name in names]
