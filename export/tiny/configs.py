"""The JSON documents of make-tiny's released layout: the checkpoint's config.json and generation_config.json, the
CLIP directory's config.json and preprocessor_config.json."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import CLIP_MEAN, CLIP_STD, LegionConfig


def write_json(path: Path, doc: dict) -> None:
    """``doc`` as indented JSON with a final newline (every JSON file make-tiny writes)."""
    path.write_text(json.dumps(doc, indent=2) + "\n")


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


def generation_config_json() -> dict:
    """generation_config.json as LLaVA's save_pretrained writes it."""
    return {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "transformers_version": "4.28.0"}
