"""The free language (steer="free"): a random LLM whose greedy text depends on the picture, with wide logit
margins, frequent <p>, </p> and [SEG], and EOS after a picture-dependent number of tokens (about FREE_EOS_AT)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from ..config import LegionConfig
from .planting import SLOT, counter_head, random_layers

FREE_WORDS = 18  # word tokens the free model can generate, besides the pieces below, <p>, </p>, [SEG] and EOS
FREE_LOGIT_STD = 32.0  # std of a generable token's logit (top-2 gaps ~ this / 3: far above fp32 ONNX error)
# Extra logits of <p>, </p>, [SEG] (in logit stds): a phrase and a mask every few tokens.
FREE_SPECIAL_BIAS = {"p_start": 1.6, "p_end": 1.6, "seg": 1.0}
FREE_EOS_AT = 40  # EOS gets as likely as an average generable token at about this generated token
FREE_IMAGE_GAIN = 4.0  # scale of the projector output: image embeddings weigh more than prompt tokens


def free_extra_pieces(tokenizer_dir: Path, prompt: set[int], seed: int) -> list[int]:
    """Pieces that exercise the detokenizer's rules inside the free model's answers: <unk> and <s> (the space the
    slow tokenizer puts before them), newline and space bytes (infer.py's replace("\\n", "") and
    replace("  ", " ")), the UTF-8 bytes of "€" (a character split over three tokens, or broken when they come
    in another order) and one word-internal piece (no leading "▁"), picked by seed."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    pieces = [sp.unk_id(), sp.bos_id()]
    pieces += [sp.piece_to_id(f"<0x{b:02X}>") for b in (0x0A, 0x20, 0xE2, 0x82, 0xAC)]
    inner = [
        i
        for i in range(sp.get_piece_size())
        if not sp.id_to_piece(i).startswith("▁")
        and sp.id_to_piece(i).isalpha()
        and i not in prompt
        and not sp.is_control(i)
        and not sp.is_byte(i)
        and not sp.is_unknown(i)
    ]
    pieces.append(random.Random(seed + 1).choice(inner))
    return pieces


@torch.no_grad()
def plant_free_language(
    model, cfg: LegionConfig, prompt: tuple[list[int], list[int]], words: list[int], seed: int
) -> dict:
    """A random LLM, unsteered, whose greedy text depends on the image, with large logit margins.

    Residual dimensions 0..5 are planted: BIAS (1 for every token), F (1 for a generable token), C (counter: share
    of generable tokens in the context, as in the loop model), after-</p>, after-<p> and after-[SEG] slots; nothing writes them
    (o_proj / down_proj / projector rows are zero), so they reach the final norm exactly as embedded.
    - lm_head: only the generable tokens (FREE_WORDS words that never occur in the prompt, <p>, </p>, [SEG]) have
      random rows (std FREE_LOGIT_STD per logit); every other token reads BIAS with a large negative gain, so the
      argmax is always among the generable tokens + EOS (few candidates: wide gaps between the top two);
    - <p>, </p>, [SEG] get a positive bias (BIAS column); </p> is always followed by [SEG], <p> by a word and
      [SEG] by neither [SEG] nor </p> (slot columns), so answers read "... <p> w w </p> [SEG] ...";
    - EOS reads C: its logit grows with the share of generated tokens and passes the generable tokens' around
      FREE_EOS_AT generated tokens, at a point that depends on the picture;
    - the projector output is scaled by FREE_IMAGE_GAIN and the layers are random, so the image embeddings move the
      hidden states by a lot: different pictures give different token sequences.
    """
    ids = cfg.token_ids
    bias_d, flag, counter, after_close, after_open, after_seg = 0, 1, 2, 3, 4, 5
    planted = [bias_d, flag, counter, after_close, after_open, after_seg]
    specials = [ids["p_start"], ids["p_end"], ids["seg"]]
    generable = [*words, *specials]
    h = cfg.hidden_size
    llm = model.llm
    gen = torch.Generator().manual_seed(1_000_003 * (seed + 1))

    emb = llm.model.embed_tokens.weight  # [V, H]
    emb.copy_(torch.randn(emb.shape, generator=gen))
    emb[:, planted] = 0.0
    emb[:, bias_d] = 1.0
    emb[generable, flag] = 1.0
    emb[ids["p_end"], after_close] = SLOT
    emb[ids["p_start"], after_open] = SLOT
    emb[ids["seg"], after_seg] = SLOT
    random_layers(llm, gen, planted, qk=0.3, vo=0.3, up=0.15, down=0.15)
    proj_out = model.mm_projector[2]
    proj_out.weight.mul_(FREE_IMAGE_GAIN)
    proj_out.bias.mul_(FREE_IMAGE_GAIN)
    proj_out.weight[planted, :] = 0.0
    proj_out.bias[planted] = 0.0

    # Counter head (layer 0, head 0): uniform causal attention reading F, written on C.
    hd = cfg.head_dim
    attn0 = counter_head(llm, hd, flag)
    attn0.o_proj.weight[counter, 0] = (
        1.0  # C ~ share(n) * F / rms(x) (the input norm): a few 1e-2 at EOS time
    )

    lm = llm.lm_head.weight  # [V, H]
    lm.zero_()
    rand_dims = [d for d in range(h) if d not in planted]
    lm[torch.tensor(generable)[:, None], torch.tensor(rand_dims)[None]] = torch.randn(
        len(generable), len(rand_dims), generator=gen
    )
    # Calibrate on a forward pass (random picture, FREE_EOS_AT random generable tokens): the final-norm hidden
    # states of the generated positions give the logit scale, the BIAS value and the counter C after the norm.
    hs = generated_hidden(model, prompt, generable, FREE_EOS_AT, gen)  # [n, H]
    logits = hs @ lm[generable].T  # [n, len(generable)]
    lm[generable] *= FREE_LOGIT_STD / float(logits.std())
    bias_after_norm = float(hs[:, bias_d].mean())
    c_at = float(hs[-8:, counter].mean())  # C after about FREE_EOS_AT generated tokens
    others = [t for t in range(cfg.vocab_size) if t not in generable and t != cfg.eos_token_id]
    lm[others, bias_d] = -1e3 * FREE_LOGIT_STD / bias_after_norm  # never the argmax
    for name, b in FREE_SPECIAL_BIAS.items():  # in logit stds
        lm[ids[name], bias_d] = b * FREE_LOGIT_STD / bias_after_norm
    big = 100 * FREE_LOGIT_STD / (SLOT * bias_after_norm)  # slot columns: decisive (slots are SLOT x BIAS)
    lm[ids["seg"], after_close] = big  # </p> -> [SEG]
    lm[ids["p_end"], after_open] = -big  # <p> -> a word
    lm[ids["seg"], after_open] = -big
    lm[ids["p_start"], after_open] = -big
    lm[ids["p_start"], after_close] = -big
    lm[ids["seg"], after_seg] = -big  # [SEG] -> not [SEG] or </p> again
    lm[ids["p_end"], after_seg] = -big
    # EOS: as high as a good generable logit (1.5 std) once C reaches its value at FREE_EOS_AT generated tokens.
    lm[cfg.eos_token_id, counter] = 1.5 * FREE_LOGIT_STD / c_at
    return {
        "words": words,
        "generable": generable,
        "eos_at": None,
        "logit_std": FREE_LOGIT_STD,
    }


@torch.no_grad()
def generated_hidden(
    model, prompt: tuple[list[int], list[int]], generable: list[int], n: int, gen
) -> torch.Tensor:
    """Final-norm hidden states [n, H] of n random generable tokens after the prompt with a random picture."""
    prefix, suffix = prompt
    patches, _ = model.clip_features(torch.randn(1, 3, 336, 336, generator=gen))
    tokens = torch.tensor(generable)[torch.randint(len(generable), (n,), generator=gen)]
    embeds = torch.cat(
        [
            model.embed_tokens(torch.tensor([prefix])),
            model.project(patches),
            model.embed_tokens(torch.tensor([suffix])),
            model.embed_tokens(tokens[None]),
        ],
        1,
    )
    return model.llm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state[0, -n:].float()
