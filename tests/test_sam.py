"""Our SAM modules (export/model/sam.py) against the independent `segment-anything` package on random weights:
the same state dict is loaded into both and the outputs are compared.

segment_anything's package __init__ imports its predictor and automatic mask generator, which import
torchvision (not a dependency of legion_rt and not installed). The modeling code itself needs only torch, so
the test loads `segment_anything/modeling/` as a standalone package under a private name, bypassing the
package __init__ instead of installing torchvision or stubbing it.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import partial

import pytest

torch = pytest.importorskip("torch", reason="export-stage tests need torch (pip install .[export])")

from legion_rt.export.config import CONFIGS  # noqa: E402
from legion_rt.export.model.sam import (  # noqa: E402
    build_grounding_encoder,
    postprocess_masks_torch,
)


def _sam_reference_modeling():
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("segment-anything is not installed (pip install .[test])")
    root = spec.submodule_search_locations[0]
    name = "_sam_reference_modeling"
    if name in sys.modules:
        return sys.modules[name]
    mspec = importlib.util.spec_from_file_location(
        name, f"{root}/modeling/__init__.py", submodule_search_locations=[f"{root}/modeling"]
    )
    module = importlib.util.module_from_spec(mspec)
    sys.modules[name] = module
    mspec.loader.exec_module(module)
    return module


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random values in every parameter and buffer (SAM zero-initializes pos_embed and rel_pos)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in sorted(module.state_dict().items()):
            t.copy_(torch.randn(t.shape, generator=g) * 0.2)


def _pair(cfg):
    """(ours, reference Sam) with identical random weights, both float64 for a tight comparison."""
    ref_mod = _sam_reference_modeling()
    ours = build_grounding_encoder(cfg).double().eval()
    _randomize(ours, 0)
    grid = cfg.sam_image_size // cfg.sam_patch_size
    ref = ref_mod.Sam(
        image_encoder=ref_mod.ImageEncoderViT(
            depth=cfg.sam_depth,
            embed_dim=cfg.sam_embed_dim,
            img_size=cfg.sam_image_size,
            mlp_ratio=cfg.sam_mlp / cfg.sam_embed_dim,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=cfg.sam_num_heads,
            patch_size=cfg.sam_patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=list(cfg.sam_global_attn_indexes),
            window_size=cfg.sam_window_size,
            out_chans=cfg.sam_out_chans,
        ),
        prompt_encoder=ref_mod.PromptEncoder(
            embed_dim=256,
            image_embedding_size=(grid, grid),
            input_image_size=(cfg.sam_image_size,) * 2,
            mask_in_chans=16,
        ),
        mask_decoder=ref_mod.MaskDecoder(
            num_multimask_outputs=3,
            transformer=ref_mod.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    )
    # Same key set (strict in both directions) proves the module names match segment-anything's.
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref.double().eval()


@pytest.fixture(scope="module")
def sam_pair():
    torch.manual_seed(0)
    return _pair(CONFIGS["tiny"])


def test_state_dict_names_match_segment_anything(sam_pair):
    ours, ref = sam_pair
    assert set(ours.state_dict()) == set(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape, k


@torch.no_grad()
def test_image_encoder_matches(sam_pair):
    ours, ref = sam_pair
    x = torch.randn(1, 3, 1024, 1024, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a = ours.image_encoder(x)
    b = ref.image_encoder(x)
    err = (a - b).abs().max().item()
    print(f"SAM image encoder max abs err (float64): {err:.3e}")  # measured 0 (same op order)
    assert a.shape == (1, 256, 64, 64)
    assert err < 1e-9
    # Control: the comparison is sensitive to the relative-position tables of a windowed block.
    rel = ours.image_encoder.blocks[0].attn.rel_pos_h
    saved = rel.clone()
    rel.add_(
        torch.randn(rel.shape, dtype=rel.dtype, generator=torch.Generator().manual_seed(9)) * 0.01
    )  # not a constant: softmax ignores those
    try:
        assert (ours.image_encoder(x) - b).abs().max().item() > 1e-4
    finally:
        rel.copy_(saved)


@torch.no_grad()
def test_mask_head_path_matches(sam_pair):
    """The LEGION prompt path: sparse = text_embeds [N,1,256], dense = no_mask_embed, multimask_output=False."""
    ours, ref = sam_pair
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(1, 256, 64, 64, dtype=torch.float64, generator=g)
    text = torch.randn(3, 256, dtype=torch.float64, generator=g)
    # segment-anything's prompt encoder has no text input; LEGION's fork concatenates text_embeds to the
    # (empty) sparse embeddings, which is exactly: sparse = text [N,1,256], dense = no_mask_embed broadcast.
    # segment-anything builds its PE grid in float32 whatever the weights' dtype: compare the PE in float32,
    # then feed the same (float64-cast) PE to both decoders.
    import copy

    ref_pe = copy.deepcopy(ref.prompt_encoder).float().get_dense_pe()
    our_pe = copy.deepcopy(ours.prompt_encoder).float().get_dense_pe()
    pe_err = (our_pe - ref_pe).abs().max().item()
    ref_pe = ref_pe.double()
    _, dense_r = ref.prompt_encoder(points=None, boxes=None, masks=None)
    dense_r = dense_r.expand(3, -1, -1, -1)
    sparse_r = text.unsqueeze(1)
    low_r, _ = ref.mask_decoder(
        image_embeddings=emb,
        image_pe=ref_pe,
        sparse_prompt_embeddings=sparse_r,
        dense_prompt_embeddings=dense_r,
        multimask_output=False,
    )
    sparse_o, dense_o = ours.prompt_encoder(text.unsqueeze(1))
    assert torch.equal(sparse_o, sparse_r) and torch.equal(dense_o, dense_r)
    low_o = ours.mask_decoder(emb, ref_pe, sparse_o, dense_o)
    err = (low_o - low_r).abs().max().item()
    print(f"dense PE max abs err {pe_err:.3e}; mask decoder max abs err (float64): {err:.3e}")
    # measured: PE (float32) 0.0, decoder (float64) 7.6e-15
    assert low_o.shape == (3, 1, 256, 256)
    assert pe_err < 1e-6
    assert err < 1e-12


@torch.no_grad()
def test_postprocess_masks_matches_sam():
    ref_mod = _sam_reference_modeling()
    g = torch.Generator().manual_seed(3)
    low = torch.randn(2, 1, 256, 256, generator=g)
    sam = ref_mod.Sam.__new__(ref_mod.Sam)  # only postprocess_masks, which reads image_encoder.img_size
    torch.nn.Module.__init__(sam)
    sam.image_encoder = type("E", (), {"img_size": 1024})()
    for input_size, original in [
        ((1024, 768), (1200, 900)),
        ((683, 1024), (480, 719)),
        ((17, 1024), (20, 1200)),
    ]:
        want = ref_mod.Sam.postprocess_masks(sam, low, input_size, original)[:, 0] > 0
        got = postprocess_masks_torch(low[:, 0], input_size, original)
        assert got.shape == (2, *original)
        assert torch.equal(got, want)


@torch.no_grad()
def test_float32_errors(sam_pair):
    """The exported graphs run in float32: the same comparison in float32 (different op order -> rounding only)."""
    import copy

    ours, ref = (copy.deepcopy(m).float() for m in sam_pair)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 3, 1024, 1024, generator=g)
    a, b = ours.image_encoder(x), ref.image_encoder(x)
    enc_err = ((a - b).abs().max() / b.abs().max()).item()
    text = torch.randn(2, 256, generator=g)
    pe = ref.prompt_encoder.get_dense_pe()
    _, dense = ref.prompt_encoder(points=None, boxes=None, masks=None)
    low_r, _ = ref.mask_decoder(b, pe, text.unsqueeze(1), dense.expand(2, -1, -1, -1), multimask_output=False)
    sparse, dense_o = ours.prompt_encoder(text.unsqueeze(1))
    low_o = ours.mask_decoder(b, ours.prompt_encoder.get_dense_pe(), sparse, dense_o)
    dec_err = ((low_o - low_r).abs().max() / low_r.abs().max()).item()
    print(f"float32 relative max err: image encoder {enc_err:.2e}, mask decoder {dec_err:.2e}")
    # measured: encoder 0.0 (identical op order on CPU), decoder 6.5e-07
    assert enc_err < 1e-5 and dec_err < 1e-5


@torch.no_grad()
def test_small_encoder_matches():
    """The `small` ViT (width 128, 4 blocks, 4 heads, global blocks 1 and 3) in float64."""
    ours, ref = _pair(CONFIGS["small"])
    x = torch.randn(1, 3, 1024, 1024, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    err = (ours.image_encoder(x) - ref.image_encoder(x)).abs().max().item()
    print(f"small SAM image encoder max abs err (float64): {err:.3e}")  # measured 0.0
    assert err < 1e-9
