"""make-tiny: a random-weight LEGION in the exact released layout, for tests, benchmarks and the demo.

    out/checkpoint/   config.json (GLaMM/LLaVA fields), pytorch_model-0000{1,2}-of-00002.bin +
                      pytorch_model.bin.index.json (bf16; also model.region_encoder.* and rotary inv_freq
                      tensors, which loaders must skip), tokenizer.model + added_tokens.json +
                      special_tokens_map.json + tokenizer_config.json
    out/clip/         full CLIPModel-style config.json (nested vision_config), model.safetensors with
                      `vision_model.*` keys (all layers) and a few text-model keys, preprocessor_config.json
    out/detector.bin  prediction_head.{0,2}.{weight,bias}

The LLM is random but planted so that greedy decoding exercises every path (see loop.py): it walks a
cycle of word tokens that contains <p>, </p> and [SEG] (so every ~9 tokens a phrase and a mask), and emits EOS
once the share of generated tokens in the context passes a threshold (at about generated token 72). Every
greedy choice wins by a large logit margin, so fp32 ONNX vs PyTorch cannot flip a token. ``steer="free"``
plants free.py's language instead: greedy text that depends on the picture.

``size="full"``: the released shapes (LLaMA-7B, SAM ViT-H, CLIP ViT-L), streamed tensor by tensor (full.py).

Modules: configs.py (the JSON documents), weights.py (shards + index, CLIP weights, detector), planting.py
(what both languages share), loop.py and free.py (the two languages), sam.py (SAM randomisation), full.py
(the streamed full-size writer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import CONFIGS
from .configs import (
    checkpoint_config_json,
    clip_config_json,
    clip_preprocessor_json,
    generation_config_json,
    write_json,
)
from .free import FREE_WORDS, free_extra_pieces, plant_free_language
from .loop import CYCLE_WORDS, plant_loop_language
from .planting import cycle_words
from .sam import randomize_sam
from .weights import write_checkpoint_shards, write_clip_weights, write_detector

__all__ = ["STEERS", "TinyPaths", "make_tiny"]

STEERS = ("loop", "free")


@dataclass(frozen=True)
class TinyPaths:
    checkpoint: Path
    clip: Path
    detector: Path


def make_tiny(out_dir, *, seed: int = 0, size: str = "tiny", steer: str = "loop") -> TinyPaths:
    """Write a random-weight LEGION (deterministic for a seed) into out_dir; see the module docstring.

    ``steer``: "loop" (default) plants a fixed token cycle (the same text for every picture, EOS at ``EOS_AT``
    of loop.py); "free" makes a random LLM whose greedy text depends on the picture (``plant_free_language``)."""
    from legion_rt.errors import RequestError

    if size not in ("tiny", "small", "full"):  # "medium" is for benchmarks; "full" is "legion-7b", streamed
        raise RequestError(f"make-tiny size must be 'tiny', 'small' or 'full', got {size!r}")
    if steer not in STEERS:
        raise RequestError(f"make-tiny steer must be 'loop' or 'free', got {steer!r}")
    if size == "full":
        if steer != "loop":  # free.py calibrates on a forward pass of the whole model (full.py's docstring)
            raise RequestError("make-tiny --size full plants the loop language only (--steer loop)")
        from .full import make_full

        return make_full(out_dir, seed=seed)
    out = Path(out_dir)
    ckpt, clip_dir = out / "checkpoint", out / "clip"
    ckpt.mkdir(parents=True, exist_ok=True)
    clip_dir.mkdir(parents=True, exist_ok=True)

    # Stale weights from an earlier run (another size, a converted copy) would shadow the new ones.
    for stale in [*ckpt.glob("*.bin"), *ckpt.glob("*.safetensors"), *ckpt.glob("*.index.json"), *clip_dir.glob("*.bin"),
                  *clip_dir.glob("*.safetensors"), *clip_dir.glob("*.index.json")]:  # fmt: skip
        stale.unlink()
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG state is left untouched
        return _make_tiny(out, ckpt, clip_dir, seed, size, steer)


def _make_tiny(out: Path, ckpt: Path, clip_dir: Path, seed: int, size: str, steer: str) -> TinyPaths:
    from ..model.legion import LegionModel
    from ..tokenizer import prompt_ids, write_tiny_tokenizer

    vocab = write_tiny_tokenizer(ckpt)
    cfg = CONFIGS[size].replace(vocab_size=vocab, name=size)
    prefix, suffix = prompt_ids(ckpt)
    prompt_len = len(prefix) + cfg.num_image_tokens + len(suffix)

    # The order of the random draws below (global RNG, ``gen``) is part of each seed's output: keep it.
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = LegionModel(cfg, with_detector=True)
    randomize_sam(model, gen)
    if steer == "loop":
        words = cycle_words(ckpt, set(prefix + suffix), seed, CYCLE_WORDS)
        plan = plant_loop_language(model, cfg, prompt_len, words)
    else:
        words = cycle_words(ckpt, set(prefix + suffix), seed, FREE_WORDS)
        words += free_extra_pieces(ckpt, set(prefix + suffix), seed)
        plan = plant_free_language(model, cfg, (prefix, suffix), words, seed)

    write_checkpoint_shards(ckpt, model, cfg, gen)
    write_json(ckpt / "config.json", checkpoint_config_json(cfg))
    write_json(ckpt / "generation_config.json", generation_config_json())

    write_clip_weights(clip_dir, model, cfg, seed, gen)
    write_json(clip_dir / "config.json", clip_config_json(cfg))
    write_json(clip_dir / "preprocessor_config.json", clip_preprocessor_json(cfg))

    detector = out / "detector.bin"
    write_detector(detector, model)
    write_json(out / "tiny_info.json", {"seed": seed, "size": size, "steer": steer, **plan})
    return TinyPaths(checkpoint=ckpt, clip=clip_dir, detector=detector)
