"""make-tiny's weight files in the released layout: the checkpoint's two bf16 shards + index (with the tensors
loaders must skip), the CLIP directory's model.safetensors (the full tower, text-model keys to ignore) and the
detector file."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import LegionConfig
from .configs import clip_config_json, write_json

SHARD_NAMES = ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin")


def _to_ckpt_key(param: str) -> str | None:
    for prefix, target in (
        ("llm.", ""),
        ("mm_projector.", "model.mm_projector."),
        ("text_hidden_fcs.", "model.text_hidden_fcs."),
        ("grounding_encoder.", "model.grounding_encoder."),
    ):
        if param.startswith(prefix):
            return target + param[len(prefix) :]
    return None  # clip.* and prediction_head.* live in their own files


def _region_encoder_tensors(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A few tensors named like GLaMM's MLVLROIQueryModule (unused at inference: loaders must skip them)."""
    return {
        "model.region_encoder.mlvl_fuse.input_conv.0.weight": torch.randn(8, 10, 1, 1, generator=gen),
        "model.region_encoder.mlvl_fuse.input_conv.0.bias": torch.randn(8, generator=gen),
        "model.region_encoder.roi_align.pconvs.0.weight": torch.randn(8, 8, 3, 3, generator=gen),
        "model.region_encoder.roi_align.pos_embedd.0.weight": torch.randn(16, 4, generator=gen),
        "model.region_encoder.roi_align.updims.weight": torch.randn(32, 16, generator=gen),
    }


def write_checkpoint_shards(ckpt: Path, model, cfg: LegionConfig, gen: torch.Generator) -> None:
    """Two bf16 shards (embeddings + the first half of the layers, then the rest) and
    pytorch_model.bin.index.json; also rotary inv_freq and region-encoder tensors (drawn from ``gen``)."""
    state = {}
    for name, t in model.state_dict().items():
        key = _to_ckpt_key(name)
        if key is not None:
            state[key] = t.detach().to(torch.bfloat16).contiguous()
    inv_freq = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    )
    for i in range(cfg.num_layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    state.update({k: v.to(torch.bfloat16) for k, v in _region_encoder_tensors(gen).items()})
    half = cfg.num_layers // 2

    def first_shard(key: str) -> bool:
        if key.startswith("model.embed_tokens."):
            return True
        if key.startswith("model.layers."):
            return int(key.split(".")[2]) < half
        return False

    shards = [
        {k: v for k, v in state.items() if first_shard(k)},
        {k: v for k, v in state.items() if not first_shard(k)},
    ]
    weight_map = {}
    for name, shard in zip(SHARD_NAMES, shards, strict=True):
        torch.save(shard, ckpt / name)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(ckpt / "pytorch_model.bin.index.json", index)


def write_clip_weights(clip_dir: Path, model, cfg: LegionConfig, seed: int, gen: torch.Generator) -> None:
    """model.safetensors: the full tower (every layer + post_layernorm), with text-model keys to ignore."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vc = CLIPVisionConfig(
        **{k: v for k, v in clip_config_json(cfg)["vision_config"].items() if k != "model_type"}
    )
    torch.manual_seed(seed + 1)
    tower = CLIPVisionModel(vc)
    clip_state = {}
    for name, t in tower.state_dict().items():
        name = name if name.startswith("vision_model.") else "vision_model." + name
        clip_state[name] = t.detach().float().contiguous()
    # Use the LegionModel's own (already random) truncated tower for the layers it has, so the model object
    # above and a reloaded one agree; the extra last layer and post_layernorm come from `tower`.
    for name, t in model.clip.state_dict().items():
        key = "vision_model." + name
        if key in clip_state:
            clip_state[key] = t.detach().float().contiguous()
    clip_state["vision_model.embeddings.position_ids"] = torch.arange(cfg.num_image_tokens + 1)[None]
    clip_state["text_model.embeddings.token_embedding.weight"] = torch.randn(64, 32, generator=gen)
    clip_state["text_projection.weight"] = torch.randn(32, 32, generator=gen)
    clip_state["visual_projection.weight"] = torch.randn(32, cfg.clip_hidden_size, generator=gen)
    clip_state["logit_scale"] = torch.tensor(2.6592)
    save_file(clip_state, str(clip_dir / "model.safetensors"), metadata={"format": "pt"})


def write_detector(path: Path, model) -> None:
    """The detector file: bare prediction_head.* keys, bf16."""
    det = {
        f"prediction_head.{k}": v.detach().to(torch.bfloat16).contiguous()
        for k, v in model.prediction_head.state_dict().items()
    }
    torch.save(det, path)
