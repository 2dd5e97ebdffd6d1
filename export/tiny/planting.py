"""What the two planted languages (loop.py, free.py) share: picking word pieces, random decoder layers that leave
the planted dimensions of the residual stream alone, and the counter head."""

from __future__ import annotations

import random
from pathlib import Path

import torch

SLOT = 4.0  # embedding value on a planted token's own dimension (bf16-exact)


def cycle_words(tokenizer_dir: Path, prompt: set[int], seed: int, count: int) -> list[int]:
    """Word pieces ('▁' + letters) that never occur in the prompt, picked by seed."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    words = [
        i
        for i in range(sp.get_piece_size())
        if sp.id_to_piece(i).startswith("▁")
        and sp.id_to_piece(i)[1:].isalpha()
        and len(sp.id_to_piece(i)) >= 4
        and i not in prompt
        and not sp.is_control(i)
        and not sp.is_byte(i)
    ]
    return random.Random(seed).sample(words, count)


@torch.no_grad()
def random_layers(
    llm, gen: torch.Generator, planted, *, qk: float, vo: float, up: float, down: float
) -> None:
    """Gaussian weights for every decoder layer (scales given for hidden 64; per-dimension magnitudes are kept
    for wider models), with the planted dimensions of the residual stream left untouched (o_proj and down_proj
    write nothing there)."""
    for layer in llm.model.layers:
        random_layer(layer, llm.config.hidden_size, gen, planted, qk=qk, vo=vo, up=up, down=down)


@torch.no_grad()
def random_layer(
    layer, hidden_size: int, gen: torch.Generator, planted, *, qk: float, vo: float, up: float, down: float
) -> None:
    """random_layers for one decoder layer (the full-size writer draws its layers one at a time)."""
    fan = (64 / hidden_size) ** 0.5
    for lin, scale in (
        (layer.self_attn.q_proj, qk),
        (layer.self_attn.k_proj, qk),
        (layer.self_attn.v_proj, vo),
        (layer.self_attn.o_proj, vo),
        (layer.mlp.gate_proj, up),
        (layer.mlp.up_proj, up),
        (layer.mlp.down_proj, down),
    ):
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * (scale * fan))
    layer.self_attn.o_proj.weight[planted, :] = 0.0
    layer.mlp.down_proj.weight[planted, :] = 0.0


@torch.no_grad()
def counter_head(llm, hd: int, flag: int):
    """Layer 0, head 0 becomes a uniform causal average of the flag dimension F (q = k = 0, v reads F, the
    head's output columns cleared for the caller to route). Returns that attention module."""
    attn0 = llm.model.layers[0].self_attn
    attn0.q_proj.weight[:hd] = 0.0
    attn0.k_proj.weight[:hd] = 0.0
    attn0.v_proj.weight[:hd] = 0.0
    attn0.v_proj.weight[0, flag] = 1.0
    attn0.o_proj.weight[:, :hd] = 0.0
    return attn0
