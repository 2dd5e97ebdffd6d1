"""SAM randomisation for make-tiny: give the position tables that SAM zero-initializes random values."""

from __future__ import annotations

import torch


def randomize_sam(model, gen: torch.Generator) -> None:
    """SAM zero-initializes its absolute and relative position tables; give them values so they matter."""
    enc = model.grounding_encoder.image_encoder
    with torch.no_grad():
        enc.pos_embed.copy_(torch.randn(enc.pos_embed.shape, generator=gen) * 0.1)
        for block in enc.blocks:
            block.attn.rel_pos_h.copy_(torch.randn(block.attn.rel_pos_h.shape, generator=gen) * 0.1)
            block.attn.rel_pos_w.copy_(torch.randn(block.attn.rel_pos_w.shape, generator=gen) * 0.1)
