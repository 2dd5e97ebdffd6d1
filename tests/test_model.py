"""export/model/legion.py: the LegionModel API of docs/FORMAT.md, checked against independent computations."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch", reason="export-stage tests need torch (pip install .[export])")

from legion_rt.export.checkpoint import load_legion  # noqa: E402
from legion_rt.export.config import CONFIGS  # noqa: E402
from legion_rt.export.model import LegionModel  # noqa: E402


@pytest.fixture(scope="module")
def model(tiny_paths):
    torch.set_num_threads(2)
    return load_legion(tiny_paths.checkpoint, tiny_paths.clip, tiny_paths.detector)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_clip_features_are_the_penultimate_hidden_state(model, tiny_paths):
    """Against transformers' own loading of the full CLIP directory (all layers) and hidden_states[-2]."""
    from transformers import CLIPVisionModel

    full = CLIPVisionModel.from_pretrained(str(tiny_paths.clip), attn_implementation="eager").eval()
    assert full.config.num_hidden_layers == model.cfg.clip_num_layers
    x = _rand(1, 3, 336, 336)
    want = full(pixel_values=x, output_hidden_states=True).hidden_states[-2]  # [1, 577, Cv]
    patches, cls = model.clip_features(x)
    err = max((patches - want[:, 1:]).abs().max().item(), (cls - want[:, 0]).abs().max().item())
    print(
        f"clip_features vs transformers hidden_states[-2]: max abs err {err:.3e}"
    )  # measured 0.0 (same ops)
    assert patches.shape == (1, 576, 64) and cls.shape == (1, 64)
    assert err < 1e-6


@torch.no_grad()
def test_projector_detector_and_text_fcs_formulas(model):
    p = model.mm_projector
    x = _rand(1, 576, 64, seed=1)
    h = x @ p[0].weight.T + p[0].bias
    gelu = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact (erf) GELU, not the tanh approximation
    want = gelu @ p[2].weight.T + p[2].bias
    assert torch.allclose(model.project(x), want, atol=1e-5, rtol=1e-5)

    d = model.prediction_head
    cls = _rand(2, 64, seed=2)
    want = torch.relu(cls @ d[0].weight.T + d[0].bias) @ d[2].weight.T + d[2].bias
    assert model.detect(cls).shape == (2, 2)
    assert torch.allclose(model.detect(cls), want, atol=1e-5, rtol=1e-5)

    t = model.text_hidden_fcs[0]
    seg = _rand(3, 64, seed=3)
    want = torch.relu(seg @ t[0].weight.T + t[0].bias) @ t[2].weight.T + t[2].bias
    assert torch.allclose(model.seg_prompts(seg), want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_mask_head_composition_and_batching(model):
    emb = model.sam_encode(_rand(1, 3, 1024, 1024, seed=4))
    assert emb.shape == (1, 256, 64, 64)
    seg = _rand(3, 64, seed=5)
    low = model.mask_head(seg, emb)
    assert low.shape == (3, 256, 256) and low.dtype == torch.float32
    # Each prompt alone gives the same mask (the image embedding is shared, prompts do not interact).
    for i in range(3):
        one = model.mask_head(seg[i : i + 1], emb)
        assert torch.allclose(one[0], low[i], atol=1e-4, rtol=1e-4)
    # The composition the reference uses: text_hidden_fcs -> sparse token, no_mask_embed dense, get_dense_pe.
    ge = model.grounding_encoder
    text = model.text_hidden_fcs[0](seg)
    dense = ge.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(3, -1, 64, 64)
    want = ge.mask_decoder(emb, ge.prompt_encoder.get_dense_pe(), text.unsqueeze(1), dense)[:, 0]
    assert torch.equal(low, want)
    assert (low > 0).any() and (low <= 0).any()  # random weights still give non-trivial masks


def test_llm_config_and_names(model):
    cfg, lc = model.cfg, model.llm.config
    assert (lc.hidden_size, lc.num_hidden_layers, lc.num_attention_heads, lc.intermediate_size, lc.vocab_size) == (
        cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size, cfg.vocab_size,
    )  # fmt: skip
    assert lc.rms_norm_eps == cfg.rms_norm_eps and not lc.tie_word_embeddings
    assert model.llm.lm_head.weight.data_ptr() != model.llm.model.embed_tokens.weight.data_ptr()
    assert model.embed_tokens(torch.tensor([[1, 2]])).shape == (1, 2, 64)


@torch.no_grad()
def test_bf16_model_takes_and_returns_float32(tiny_paths):
    m = load_legion(tiny_paths.checkpoint, tiny_paths.clip, tiny_paths.detector, dtype=torch.bfloat16)
    patches, cls = m.clip_features(_rand(1, 3, 336, 336))
    assert patches.dtype == cls.dtype == m.project(patches).dtype == m.detect(cls).dtype == torch.float32
    emb = m.sam_encode(_rand(1, 3, 1024, 1024))
    assert m.mask_head(_rand(2, 64), emb).dtype == torch.float32


def test_meta_construction_of_the_real_size():
    """legion-7b builds on the meta device (no memory) with the released tensor count and shapes."""
    with torch.device("meta"):
        m = LegionModel(CONFIGS["legion-7b"], with_detector=True)
    sd = m.state_dict()
    llm_and_heads = [k for k in sd if not k.startswith(("clip.", "prediction_head."))]
    # LLM 32 x 9 + 3, projector 4, text_hidden_fcs 4, SAM ViT-H 32 x 14 + 9, prompt encoder 17, mask decoder
    # 120: 893 loaded tensors. The released index has 968 keys = 893 + 32 rotary inv_freq + the region
    # encoder's (skipped) tensors.
    assert sd["llm.model.embed_tokens.weight"].shape == (32007, 4096)
    assert sd["grounding_encoder.image_encoder.blocks.7.attn.rel_pos_h"].shape == (127, 80)
    assert sd["grounding_encoder.image_encoder.blocks.0.attn.rel_pos_h"].shape == (27, 80)
    assert sd["mm_projector.0.weight"].shape == (4096, 1024)
    assert sd["text_hidden_fcs.0.2.weight"].shape == (256, 4096)
    assert sd["prediction_head.0.weight"].shape == (2048, 1024)
    n_params = sum(v.numel() for k, v in sd.items() if not k.startswith(("clip.", "prediction_head.")))
    # LLaMA-7B (6.74e9 with vocab 32007) + SAM ViT-H (0.64e9) + heads: ~7.4e9 parameters.
    assert 7.0e9 < n_params < 8.4e9
    assert len(llm_and_heads) == 893
