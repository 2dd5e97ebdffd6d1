"""The loop language (steer="loop"): greedy decoding walks a fixed cycle of tokens with a phrase and a [SEG] every
9 tokens, the same text for every picture, and emits EOS at about generated token EOS_AT."""

from __future__ import annotations

import torch

from ..config import LegionConfig
from .planting import SLOT, counter_head, random_layers

EOS_AT = 72  # greedy decoding emits EOS as (about) this generated token
CYCLE_WORDS = 6  # word tokens in the planted cycle, besides <p>, </p>, [SEG]
LOGIT_GAIN = 1024.0  # lm_head value on planted dimensions (bf16-exact)
LAYER_SCALES = {"qk": 0.3, "vo": 0.15, "up": 0.15, "down": 0.1}  # random_layers scales of the loop model


def _bf16(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).bfloat16().float().item()


@torch.no_grad()
def plant_loop_language(model, cfg: LegionConfig, prompt_len: int, words: list[int]) -> dict:
    """Make greedy decoding a fixed cycle with phrases and [SEG]s, ending with EOS at about EOS_AT.

    Dimensions of the residual stream: one per cycle token (its "slot"), DEFAULT (every other token), F (flag
    of a generated token), C (counter). The rest stays random, so hidden states still depend on the image.
    - embeddings: cycle token = SLOT on its slot + 1 on F and nothing else; other tokens keep their random part
      plus SLOT on DEFAULT; the projector writes nothing on the planted dims.
    - layer 0, head 0: q = k = 0 (uniform causal attention) and v reads F, so its output, written on C, is
      proportional to the share of generated tokens in the context; nothing else writes on planted dims.
    - lm_head: row of succ(t) reads t's slot only, the first cycle token reads DEFAULT only, EOS reads C only;
      other rows are small random values off the planted dims. EOS wins once C exceeds SLOT.
    """
    ids = cfg.token_ids
    cycle = [
        words[0],
        ids["p_start"],
        words[1],
        words[2],
        ids["p_end"],
        ids["seg"],
        words[3],
        words[4],
        words[5],
    ]
    k = len(cycle)
    default, flag, counter = k, k + 1, k + 2
    planted = list(range(k + 3))
    h = cfg.hidden_size
    llm = model.llm
    emb = llm.model.embed_tokens.weight  # [V, H]
    gen = torch.Generator().manual_seed(1234)

    # Random parts with a readable scale (HF's 0.02 init would make every layer a no-op).
    emb.copy_(torch.randn(emb.shape, generator=gen))
    emb[:, planted] = 0.0
    emb[:, default] = SLOT
    for slot, tok in enumerate(cycle):
        emb[tok] = 0.0
        emb[tok, slot] = SLOT
        emb[tok, flag] = 1.0
    random_layers(llm, gen, planted, **LAYER_SCALES)
    proj_out = model.mm_projector[2]
    proj_out.weight[planted, :] = 0.0
    proj_out.bias[planted] = 0.0

    # Counter head: layer 0, head 0.
    hd = cfg.head_dim
    attn0 = counter_head(llm, hd, flag)
    # Value of a generated position: F / rms(embedding) (input RMSNorm, weight 1).
    rms_c = ((SLOT**2 + 1.0) / h + cfg.rms_norm_eps) ** 0.5
    value = 1.0 / rms_c

    def share(n: int) -> float:  # after n generated tokens were fed (uniform attention over prompt_len + n)
        return n / (prompt_len + n)

    # Choose the bf16 gain that puts the crossing between n = EOS_AT-2 and EOS_AT-1 with the widest margin:
    # C(n) = gain * value * share(n) vs SLOT; token EOS_AT is predicted with n = EOS_AT - 1 tokens fed.
    ideal = SLOT / (value * 0.5 * (share(EOS_AT - 2) + share(EOS_AT - 1)))
    best = None
    for cand in {_bf16(ideal * (1 + d / 256)) for d in range(-4, 5)}:
        c = [cand * value * share(n) for n in range(0, 4 * EOS_AT)]
        crossing = next((n for n, x in enumerate(c) if x > SLOT), None)
        if crossing is None:
            continue
        rel = min(abs(x - SLOT) for x in c) / SLOT
        if best is None or rel > best[0]:
            best = (rel, cand, crossing)
    rel_margin, gain, crossing = best
    attn0.o_proj.weight[counter, 0] = gain

    lm = llm.lm_head.weight  # [V, H]
    lm.copy_(torch.randn(lm.shape, generator=gen) * 0.02)
    lm[:, planted] = 0.0
    # The planted rows read only planted dimensions, so their logits do not depend on the random dimensions.
    lm[cycle] = 0.0
    lm[cfg.eos_token_id] = 0.0
    for slot in range(k):
        lm[cycle[(slot + 1) % k], slot] = LOGIT_GAIN
    lm[cycle[0], default] = LOGIT_GAIN
    lm[cfg.eos_token_id, counter] = LOGIT_GAIN
    return {
        "cycle": cycle,
        "planted": planted,
        "eos_at": crossing + 1,
        "eos_relative_margin": rel_margin,
        "counter_gain": gain,
    }
