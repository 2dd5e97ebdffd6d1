"""export/config.py: sizes from config files and tensor shapes; the registry of named sizes."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="export-stage tests need torch (pip install .[export])")

from legion_rt.errors import CheckpointError  # noqa: E402
from legion_rt.export.config import CONFIGS, config_from_sources, sam_encoder_dims  # noqa: E402
from legion_rt.export.model.sam import build_grounding_encoder  # noqa: E402

# The vision part of openai/clip-vit-large-patch14-336's config.json (a full CLIPModel config), as published.
REAL_CLIP_CONFIG = {
    "architectures": ["CLIPModel"],
    "model_type": "clip",
    "projection_dim": 768,
    "text_config": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "projection_dim": 768,
        "max_position_embeddings": 77,
    },  # fmt: skip
    "vision_config": {
        "dropout": 0.0,
        "hidden_act": "quick_gelu",
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "layer_norm_eps": 1e-05,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
        "initializer_factor": 1.0,
    },  # fmt: skip
}
REAL_PREPROCESSOR = {
    "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 336,
}  # fmt: skip
GLAMM_CONFIG = {
    "architectures": ["LegionForCausalLM"], "model_type": "llava", "hidden_size": 4096, "intermediate_size": 11008,
    "num_attention_heads": 32, "num_hidden_layers": 32, "rms_norm_eps": 1e-05, "vocab_size": 32007,
    "max_position_embeddings": 4096, "out_dim": 256, "mm_hidden_size": 1024, "mm_vision_select_layer": -2,
    "mm_use_im_start_end": True, "vision_tower": "openai/clip-vit-large-patch14-336", "torch_dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "rope_scaling": None, "tie_word_embeddings": False,
}  # fmt: skip


def _sam_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape of a SAM built on the meta device (no memory)."""
    with torch.device("meta"):
        ge = build_grounding_encoder(cfg)
    return {"model.grounding_encoder." + k: tuple(v.shape) for k, v in ge.state_dict().items()}


@pytest.mark.parametrize("name", ["tiny", "small", "legion-7b"])
def test_sam_encoder_dims_from_shapes(name):
    cfg = CONFIGS[name]
    dims = sam_encoder_dims(_sam_shapes(cfg))
    assert dims["sam_embed_dim"] == cfg.sam_embed_dim
    assert dims["sam_depth"] == cfg.sam_depth
    assert dims["sam_num_heads"] == cfg.sam_num_heads
    assert dims["sam_window_size"] == cfg.sam_window_size
    assert dims["sam_global_attn_indexes"] == cfg.sam_global_attn_indexes
    assert dims["sam_mlp_dim"] == cfg.sam_mlp and dims["sam_out_chans"] == 256
    assert (dims["sam_patch_size"], dims["sam_image_size"]) == (16, 1024)


def test_sam_encoder_dims_other_variants():
    # SAM ViT-B (768, 12 blocks, 12 heads, global 2,5,8,11) and an unusual window.
    vit_b = CONFIGS["legion-7b"].replace(
        sam_embed_dim=768, sam_depth=12, sam_num_heads=12, sam_global_attn_indexes=(2, 5, 8, 11)
    )
    dims = sam_encoder_dims(_sam_shapes(vit_b))
    assert (dims["sam_embed_dim"], dims["sam_depth"], dims["sam_num_heads"]) == (768, 12, 12)
    assert dims["sam_global_attn_indexes"] == (2, 5, 8, 11)
    odd = CONFIGS["tiny"].replace(sam_window_size=8, sam_global_attn_indexes=())
    assert sam_encoder_dims(_sam_shapes(odd))["sam_window_size"] == 8
    shapes = _sam_shapes(CONFIGS["tiny"])
    del shapes["model.grounding_encoder.image_encoder.blocks.0.attn.rel_pos_h"]
    with pytest.raises(CheckpointError, match="blocks.0.attn.rel_pos_h"):
        sam_encoder_dims(shapes)


def test_real_sizes_from_the_published_configs():
    cfg = config_from_sources(
        GLAMM_CONFIG, REAL_CLIP_CONFIG, _sam_shapes(CONFIGS["legion-7b"]), preprocessor=REAL_PREPROCESSOR
    )
    ref = CONFIGS["legion-7b"]
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                  "clip_hidden_size", "clip_num_layers", "clip_num_heads", "clip_intermediate_size", "clip_image_size",
                  "clip_patch_size", "clip_hidden_act", "sam_embed_dim", "sam_depth", "sam_num_heads",
                  "sam_window_size", "sam_global_attn_indexes", "clip_mean", "clip_std"):  # fmt: skip
        assert getattr(cfg, field) == getattr(ref, field), field
    assert cfg.num_kv_heads == 32  # absent from config.json: = heads
    assert cfg.name == "legion-7b"  # recognised from its architecture
    assert cfg.head_dim == 128 and cfg.num_image_tokens == 576 and cfg.clip_layers_needed == 23
    assert cfg.token_ids == {"bos": 1, "eos": 2, "unk": 0, "pad": 0, "im_start": 32000, "im_end": 32001, "bbox": 32002,
                             "point": 32003, "seg": 32004, "p_start": 32005, "p_end": 32006}  # fmt: skip
    assert cfg.sam_embedding_hw == (64, 64) and cfg.low_res_hw == (256, 256)
    # A CLIPVisionModel-style config (fields at top level) gives the same tower.
    flat = config_from_sources(
        GLAMM_CONFIG, REAL_CLIP_CONFIG["vision_config"], _sam_shapes(CONFIGS["legion-7b"])
    )
    assert flat.clip_hidden_size == 1024 and flat.clip_num_layers == 24


def test_inconsistent_configs_are_refused():
    shapes = _sam_shapes(CONFIGS["legion-7b"])
    missing = {k: v for k, v in GLAMM_CONFIG.items() if k != "hidden_size"}
    with pytest.raises(CheckpointError, match="hidden_size"):
        config_from_sources(missing, REAL_CLIP_CONFIG, shapes)
    with pytest.raises(CheckpointError, match="mm_hidden_size 768"):
        config_from_sources({**GLAMM_CONFIG, "mm_hidden_size": 768}, REAL_CLIP_CONFIG, shapes)
    with pytest.raises(CheckpointError, match="crop size 224"):
        config_from_sources(
            GLAMM_CONFIG, REAL_CLIP_CONFIG, shapes, preprocessor={**REAL_PREPROCESSOR, "crop_size": 224}
        )
    with pytest.raises(CheckpointError, match="rope_scaling"):
        config_from_sources(
            {**GLAMM_CONFIG, "rope_scaling": {"type": "linear", "factor": 2.0}}, REAL_CLIP_CONFIG, shapes
        )
    added = {
        "<im_start>": 32000,
        "<im_end>": 32001,
        "<bbox>": 32002,
        "<point>": 32003,
        "[SEG]": 32004,
        "<p>": 32005,
        "</p>": 32006,
    }
    config_from_sources(GLAMM_CONFIG, REAL_CLIP_CONFIG, shapes, added_tokens=added)
    with pytest.raises(CheckpointError, match=r"\[SEG\]"):
        config_from_sources(GLAMM_CONFIG, REAL_CLIP_CONFIG, shapes, added_tokens={**added, "[SEG]": 32005})


def test_registry_sizes():
    tiny, small = CONFIGS["tiny"], CONFIGS["small"]
    assert (tiny.hidden_size, tiny.num_layers, tiny.num_heads, tiny.intermediate_size) == (64, 2, 4, 172)
    assert (tiny.clip_hidden_size, tiny.clip_num_layers, tiny.clip_image_size, tiny.clip_patch_size) == (
        64,
        3,
        336,
        14,
    )
    assert (tiny.sam_embed_dim, tiny.sam_depth, tiny.sam_num_heads, tiny.sam_global_attn_indexes) == (
        32,
        2,
        2,
        (1,),
    )
    assert (small.hidden_size, small.num_layers, small.clip_hidden_size, small.clip_num_layers) == (
        512,
        6,
        256,
        6,
    )
    assert (small.sam_embed_dim, small.sam_depth) == (128, 4)
    for cfg in CONFIGS.values():  # SAM's prompt encoder and mask decoder keep the real sizes everywhere
        assert (cfg.prompt_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads, cfg.decoder_mlp_dim) == (
            256,
            2,
            8,
            2048,
        )
        assert cfg.num_image_tokens == 576 and cfg.vocab_size == cfg.base_vocab_size + 7
