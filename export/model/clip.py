"""The CLIP vision tower: transformers' CLIPVisionModel, truncated to the layers LEGION reads.

LEGION uses `hidden_states[mm_vision_select_layer]` (-2: the output of the penultimate encoder layer, before
any post-layernorm). A tower built with only those layers returns exactly that tensor as `last_hidden_state`,
so the last layer is never computed. Parameter names are CLIPVisionModel's, without the `vision_model.` prefix
of the CLIP checkpoint files (export/checkpoint.py maps them).
"""

from __future__ import annotations

import torch
from torch import nn


def build_clip_vision(cfg, *, attn_implementation: str = "eager") -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vc = CLIPVisionConfig(
        hidden_size=cfg.clip_hidden_size,
        intermediate_size=cfg.clip_intermediate_size,
        num_hidden_layers=cfg.clip_layers_needed,
        num_attention_heads=cfg.clip_num_heads,
        image_size=cfg.clip_image_size,
        patch_size=cfg.clip_patch_size,
        hidden_act=cfg.clip_hidden_act,
        layer_norm_eps=cfg.clip_layer_norm_eps,
        num_channels=3,
    )
    vc._attn_implementation = attn_implementation
    return CLIPVisionModel(vc)


def clip_penultimate(tower: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """pixels [B, 3, 336, 336] -> hidden_states[select_layer] [B, 1 + 576, Cv] (CLS first)."""
    return tower(pixel_values=pixels).last_hidden_state


def fix_clip_buffers(tower: nn.Module) -> None:
    """Recreate CLIP's non-persistent `position_ids` buffer (left on the meta device by meta construction)."""
    emb = tower.embeddings if hasattr(tower, "embeddings") else tower.vision_model.embeddings
    n = emb.position_embedding.weight.shape[0]
    emb.register_buffer("position_ids", torch.arange(n).expand((1, -1)), persistent=False)
