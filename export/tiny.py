"""make-tiny: a random-weight LEGION in the exact released layout, for tests, benchmarks and the demo.

    out/checkpoint/   config.json (GLaMM/LLaVA fields), pytorch_model-0000{1,2}-of-00002.bin +
                      pytorch_model.bin.index.json (bf16; also model.region_encoder.* and rotary inv_freq
                      tensors, which loaders must skip), tokenizer.model + added_tokens.json +
                      special_tokens_map.json + tokenizer_config.json
    out/clip/         full CLIPModel-style config.json (nested vision_config), model.safetensors with
                      `vision_model.*` keys (all layers) and a few text-model keys, preprocessor_config.json
    out/detector.bin  prediction_head.{0,2}.{weight,bias}

The LLM is random but planted so that greedy decoding exercises every path (see `_plant_language`): it walks a
cycle of word tokens that contains <p>, </p> and [SEG] (so every ~9 tokens a phrase and a mask), and emits EOS
once the share of generated tokens in the context passes a threshold (at about generated token 72). Every
greedy choice wins by a large logit margin, so fp32 ONNX vs PyTorch cannot flip a token.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import CLIP_MEAN, CLIP_STD, CONFIGS, LegionConfig

EOS_AT = 72  # greedy decoding emits EOS as (about) this generated token
CYCLE_WORDS = 6  # word tokens in the planted cycle, besides <p>, </p>, [SEG]
SLOT = 4.0  # embedding value on a planted token's own dimension (bf16-exact)
LOGIT_GAIN = 1024.0  # lm_head value on planted dimensions (bf16-exact)


@dataclass(frozen=True)
class TinyPaths:
    checkpoint: Path
    clip: Path
    detector: Path


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


def checkpoint_config_json(cfg: LegionConfig) -> dict:
    """config.json as GLaMM/LEGION's save_pretrained writes it (fields: docs/REFERENCE.md "Checkpoint layout")."""
    return {
        "architectures": ["LegionForCausalLM"],
        "model_type": "llava",
        "bbox_token_idx": cfg.token_ids["bbox"],
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "image_aspect": "square",
        "image_aspect_ratio": "square",
        "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size,
        "max_length": cfg.max_position_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "mm_hidden_size": cfg.clip_hidden_size,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": True,
        "mm_use_image_start_end": True,
        "mm_vision_module": "openai/clip-vit-large-patch14-336",
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": cfg.clip_select_layer,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "vision_tower": "openai/clip-vit-large-patch14-336",
        "vision_module": "openai/clip-vit-large-patch14-336",
        "num_attention_heads": cfg.num_heads,
        "num_hidden_layers": cfg.num_layers,
        "num_key_value_heads": cfg.num_kv_heads,
        "num_level_reg_features": 4,
        "num_reg_features": 4,
        "out_dim": cfg.out_dim,
        "pretraining_tp": 1,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_scaling": None,
        "select_feature_type": "patch",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "train_mask_decoder": True,
        "transformers_version": "4.28.0",
        "use_cache": False,
        "use_mm_proj": True,
        "vocab_size": cfg.vocab_size,
        "with_region": True,
    }


def clip_config_json(cfg: LegionConfig) -> dict:
    """A full CLIPModel config.json (text + nested vision_config), like openai/clip-vit-large-patch14-336's."""
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": 32,
        "logit_scale_init_value": 2.6592,
        "initializer_factor": 1.0,
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "clip_text_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 64,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "projection_dim": 32,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": cfg.clip_hidden_size,
            "intermediate_size": cfg.clip_intermediate_size,
            "num_hidden_layers": cfg.clip_num_layers,
            "num_attention_heads": cfg.clip_num_heads,
            "image_size": cfg.clip_image_size,
            "patch_size": cfg.clip_patch_size,
            "hidden_act": cfg.clip_hidden_act,
            "layer_norm_eps": cfg.clip_layer_norm_eps,
            "projection_dim": 32,
            "dropout": 0.0,
            "attention_dropout": 0.0,
        },
    }


def clip_preprocessor_json(cfg: LegionConfig) -> dict:
    """As openai/clip-vit-large-patch14-336's preprocessor_config.json (bicubic = resample 3)."""
    return {
        "crop_size": cfg.clip_image_size,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "resample": 3,
        "size": cfg.clip_image_size,
    }


# ---------------------------------------------------------------------------------------------------------------
# The planted language


def _bf16(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).bfloat16().float().item()


def _cycle_words(tokenizer_dir: Path, prompt: set[int], seed: int, count: int = CYCLE_WORDS) -> list[int]:
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
def _random_layers(
    llm, gen: torch.Generator, planted, *, qk: float, vo: float, up: float, down: float
) -> None:
    """Gaussian weights for every decoder layer (scales given for hidden 64; per-dimension magnitudes are kept
    for wider models), with the planted dimensions of the residual stream left untouched (o_proj and down_proj
    write nothing there)."""
    fan = (64 / llm.config.hidden_size) ** 0.5
    for layer in llm.model.layers:
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
def _counter_head(llm, hd: int, flag: int):
    """Layer 0, head 0 becomes a uniform causal average of the flag dimension F (q = k = 0, v reads F, the
    head's output columns cleared for the caller to route). Returns that attention module."""
    attn0 = llm.model.layers[0].self_attn
    attn0.q_proj.weight[:hd] = 0.0
    attn0.k_proj.weight[:hd] = 0.0
    attn0.v_proj.weight[:hd] = 0.0
    attn0.v_proj.weight[0, flag] = 1.0
    attn0.o_proj.weight[:, :hd] = 0.0
    return attn0


@torch.no_grad()
def _plant_language(model, cfg: LegionConfig, prompt_len: int, words: list[int]) -> dict:
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
    _random_layers(llm, gen, planted, qk=0.3, vo=0.15, up=0.15, down=0.1)
    proj_out = model.mm_projector[2]
    proj_out.weight[planted, :] = 0.0
    proj_out.bias[planted] = 0.0

    # Counter head: layer 0, head 0.
    hd = cfg.head_dim
    attn0 = _counter_head(llm, hd, flag)
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
    return {"cycle": cycle, "eos_at": crossing + 1, "eos_relative_margin": rel_margin, "counter_gain": gain}


# ---------------------------------------------------------------------------------------------------------------
# The free language (steer="free"): greedy text that depends on the picture

FREE_WORDS = 18  # word tokens the free model can generate, besides the pieces below, <p>, </p>, [SEG] and EOS
FREE_LOGIT_STD = 32.0  # std of a generable token's logit (top-2 gaps ~ this / 3: far above fp32 ONNX error)
# Extra logits of <p>, </p>, [SEG] (in logit stds): a phrase and a mask every few tokens.
FREE_SPECIAL_BIAS = {"p_start": 1.6, "p_end": 1.6, "seg": 1.0}
FREE_EOS_AT = 40  # EOS gets as likely as an average generable token at about this generated token
FREE_IMAGE_GAIN = 4.0  # scale of the projector output: image embeddings weigh more than prompt tokens


def _free_extra_pieces(tokenizer_dir: Path, prompt: set[int], seed: int) -> list[int]:
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
def _free_language(
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
    _random_layers(llm, gen, planted, qk=0.3, vo=0.3, up=0.15, down=0.15)
    proj_out = model.mm_projector[2]
    proj_out.weight.mul_(FREE_IMAGE_GAIN)
    proj_out.bias.mul_(FREE_IMAGE_GAIN)
    proj_out.weight[planted, :] = 0.0
    proj_out.bias[planted] = 0.0

    # Counter head (layer 0, head 0): uniform causal attention reading F, written on C.
    hd = cfg.head_dim
    attn0 = _counter_head(llm, hd, flag)
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
    hs = _generated_hidden(model, prompt, generable, FREE_EOS_AT, gen)  # [n, H]
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
def _generated_hidden(
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


# ---------------------------------------------------------------------------------------------------------------


def _randomize_sam(model, gen: torch.Generator) -> None:
    """SAM zero-initializes its absolute and relative position tables; give them values so they matter."""
    enc = model.grounding_encoder.image_encoder
    with torch.no_grad():
        enc.pos_embed.copy_(torch.randn(enc.pos_embed.shape, generator=gen) * 0.1)
        for block in enc.blocks:
            block.attn.rel_pos_h.copy_(torch.randn(block.attn.rel_pos_h.shape, generator=gen) * 0.1)
            block.attn.rel_pos_w.copy_(torch.randn(block.attn.rel_pos_w.shape, generator=gen) * 0.1)


def _region_encoder_tensors(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A few tensors named like GLaMM's MLVLROIQueryModule (unused at inference: loaders must skip them)."""
    return {
        "model.region_encoder.mlvl_fuse.input_conv.0.weight": torch.randn(8, 10, 1, 1, generator=gen),
        "model.region_encoder.mlvl_fuse.input_conv.0.bias": torch.randn(8, generator=gen),
        "model.region_encoder.roi_align.pconvs.0.weight": torch.randn(8, 8, 3, 3, generator=gen),
        "model.region_encoder.roi_align.pos_embedd.0.weight": torch.randn(16, 4, generator=gen),
        "model.region_encoder.roi_align.updims.weight": torch.randn(32, 16, generator=gen),
    }


STEERS = ("loop", "free")


def make_tiny(out_dir, *, seed: int = 0, size: str = "tiny", steer: str = "loop") -> TinyPaths:
    """Write a random-weight LEGION (deterministic for a seed) into out_dir; see the module docstring.

    ``steer``: "loop" (default) plants a fixed token cycle (the same text for every picture, EOS at ``EOS_AT``);
    "free" makes a random LLM whose greedy text depends on the picture (``_free_language``)."""
    from legion_rt.errors import RequestError

    if size not in ("tiny", "small"):  # "medium" and "legion-7b" are for plans and benchmarks
        raise RequestError(f"make-tiny size must be 'tiny' or 'small', got {size!r}")
    if steer not in STEERS:
        raise RequestError(f"make-tiny steer must be 'loop' or 'free', got {steer!r}")
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
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from .model.legion import LegionModel
    from .tokenizer import prompt_ids, write_tiny_tokenizer

    vocab = write_tiny_tokenizer(ckpt)
    cfg = CONFIGS[size].replace(vocab_size=vocab, name=size)
    prefix, suffix = prompt_ids(ckpt)
    prompt_len = len(prefix) + cfg.num_image_tokens + len(suffix)

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = LegionModel(cfg, with_detector=True)
    _randomize_sam(model, gen)
    if steer == "loop":
        plan = _plant_language(model, cfg, prompt_len, _cycle_words(ckpt, set(prefix + suffix), seed))
    else:
        words = _cycle_words(ckpt, set(prefix + suffix), seed, FREE_WORDS)
        words += _free_extra_pieces(ckpt, set(prefix + suffix), seed)
        plan = _free_language(model, cfg, (prefix, suffix), words, seed)

    # --- checkpoint: two bf16 shards + index ---
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

    names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    shards = [
        {k: v for k, v in state.items() if first_shard(k)},
        {k: v for k, v in state.items() if not first_shard(k)},
    ]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        torch.save(shard, ckpt / name)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (ckpt / "config.json").write_text(json.dumps(checkpoint_config_json(cfg), indent=2) + "\n")
    (ckpt / "generation_config.json").write_text(
        json.dumps(
            {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "transformers_version": "4.28.0"},
            indent=2,
        )
        + "\n"
    )

    # --- CLIP directory: the full tower (every layer + post_layernorm), with text-model keys to ignore ---
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
    from safetensors.torch import save_file

    save_file(clip_state, str(clip_dir / "model.safetensors"), metadata={"format": "pt"})
    (clip_dir / "config.json").write_text(json.dumps(clip_config_json(cfg), indent=2) + "\n")
    (clip_dir / "preprocessor_config.json").write_text(
        json.dumps(clip_preprocessor_json(cfg), indent=2) + "\n"
    )

    # --- detector: bare prediction_head.* keys ---
    detector = out / "detector.bin"
    det = {
        f"prediction_head.{k}": v.detach().to(torch.bfloat16).contiguous()
        for k, v in model.prediction_head.state_dict().items()
    }
    torch.save(det, detector)
    (out / "tiny_info.json").write_text(
        json.dumps({"seed": seed, "size": size, "steer": steer, **plan}, indent=2) + "\n"
    )
    return TinyPaths(checkpoint=ckpt, clip=clip_dir, detector=detector)
