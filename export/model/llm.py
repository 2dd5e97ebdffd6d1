"""The LLM: transformers' LlamaForCausalLM built from a LegionConfig (untied lm_head, no rope scaling).
Its parameter names equal the released checkpoint's (`model.embed_tokens`, `model.layers.N.*`, `model.norm`,
`lm_head`)."""

from __future__ import annotations

import torch
from torch import nn


def llama_config(cfg, *, attn_implementation: str = "eager"):
    from transformers import LlamaConfig

    lc = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        use_cache=True,
    )
    lc._attn_implementation = attn_implementation
    return lc


def build_llm(cfg, *, attn_implementation: str = "eager") -> nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(llama_config(cfg, attn_implementation=attn_implementation))


def fix_llm_buffers(llm: nn.Module) -> None:
    """Recreate the rotary embedding (its inv_freq buffers are not persistent: the checkpoint's
    `rotary_emb.inv_freq` copies are skipped on purpose and the values are recomputed in float32)."""
    rotary = llm.model.rotary_emb
    with torch.device("cpu"):
        llm.model.rotary_emb = type(rotary)(config=llm.config)
