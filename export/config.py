"""LegionConfig: every size of the LEGION model, read from the checkpoint's config.json, the CLIP directory's
config.json and preprocessor_config.json, and the tensors' shapes (SAM's ViT is never hard-coded).

A registry of named sizes (`CONFIGS`) serves the random-weight models of tests and benchmarks.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from legion_rt.artifacts import read_json_object
from legion_rt.errors import CheckpointError

# Reference constants (docs/REFERENCE.md "Preprocessing"), defined once in legion_rt/manifest.py. CLIP's come from
# preprocessor_config.json when it is present.
from legion_rt.manifest import CLIP_MEAN, CLIP_STD, SAM_MEAN, SAM_STD  # noqa: E402

# The 7 tokens added after the sentencepiece vocabulary, in id order.
ADDED_TOKENS = ("<im_start>", "<im_end>", "<bbox>", "<point>", "[SEG]", "<p>", "</p>")
IMAGE_TOKEN_INDEX = -200

SAM_ENCODER_PREFIX = "model.grounding_encoder.image_encoder."


@dataclass(frozen=True, kw_only=True)
class LegionConfig:
    """All sizes and constants of one LEGION model. H = hidden_size, Cv = clip_hidden_size."""

    name: str = "checkpoint"
    # --- LLM (LLaMA) ---
    vocab_size: int  # sentencepiece vocabulary + 7 added tokens
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    out_dim: int = 256  # text_hidden_fcs output = SAM prompt dim
    # --- CLIP vision tower ---
    clip_hidden_size: int
    clip_num_layers: int  # layers of the full tower (24 for ViT-L); only clip_layers_needed are run
    clip_num_heads: int
    clip_intermediate_size: int
    clip_image_size: int = 336
    clip_patch_size: int = 14
    clip_hidden_act: str = "quick_gelu"
    clip_layer_norm_eps: float = 1e-5
    clip_select_layer: int = -2  # mm_vision_select_layer: index into hidden_states (L+1 entries)
    clip_mean: tuple[float, float, float] = CLIP_MEAN
    clip_std: tuple[float, float, float] = CLIP_STD
    # --- detector head (prediction_head: Linear(Cv, D) - ReLU - Linear(D, 2)) ---
    detector_hidden_size: int | None = None  # None = 2 * clip_hidden_size
    # --- SAM ViT image encoder (read from tensor shapes) ---
    sam_embed_dim: int
    sam_depth: int
    sam_num_heads: int
    sam_window_size: int = 14
    sam_global_attn_indexes: tuple[int, ...]
    sam_mlp_dim: int | None = None  # None = 4 * sam_embed_dim
    sam_patch_size: int = 16
    sam_image_size: int = 1024
    sam_out_chans: int = 256
    sam_mean: tuple[float, float, float] = SAM_MEAN
    sam_std: tuple[float, float, float] = SAM_STD
    # --- SAM prompt encoder + mask decoder: SAM constants, the same in every size ---
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    # --- special tokens ---
    bos_token_id: int = 1
    eos_token_id: int = 2
    unk_token_id: int = 0
    pad_token_id: int = 0
    # --- storage dtype of the checkpoint (config.json torch_dtype) ---
    torch_dtype: str = "bfloat16"
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    # Derived sizes -----------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_image_tokens(self) -> int:
        return (self.clip_image_size // self.clip_patch_size) ** 2  # 576 at 336/14

    @property
    def clip_layers_needed(self) -> int:
        """Encoder layers to run for hidden_states[select_layer] (hidden_states[0] is the embedding output)."""
        return (
            self.clip_num_layers + 1 + self.clip_select_layer
            if self.clip_select_layer < 0
            else self.clip_select_layer
        )

    @property
    def detector_hidden(self) -> int:
        return self.detector_hidden_size or 2 * self.clip_hidden_size

    @property
    def sam_mlp(self) -> int:
        return self.sam_mlp_dim or 4 * self.sam_embed_dim

    @property
    def sam_embedding_hw(self) -> tuple[int, int]:
        g = self.sam_image_size // self.sam_patch_size
        return (g, g)  # (64, 64)

    @property
    def low_res_hw(self) -> tuple[int, int]:
        h, w = self.sam_embedding_hw
        return (4 * h, 4 * w)  # (256, 256): the mask decoder upscales x4

    @property
    def base_vocab_size(self) -> int:
        return self.vocab_size - len(ADDED_TOKENS)

    @property
    def token_ids(self) -> dict[str, int]:
        """bos/eos/unk/pad and the 7 added tokens (ids base_vocab_size ... base_vocab_size+6)."""
        b = self.base_vocab_size
        names = ("im_start", "im_end", "bbox", "point", "seg", "p_start", "p_end")
        ids = {
            "bos": self.bos_token_id,
            "eos": self.eos_token_id,
            "unk": self.unk_token_id,
            "pad": self.pad_token_id,
        }
        ids.update({n: b + i for i, n in enumerate(names)})
        return ids

    @property
    def seg_token_id(self) -> int:
        return self.token_ids["seg"]

    def replace(self, **changes) -> LegionConfig:
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------------------------
# Registry of named sizes. Vocab 1007 = the shipped tiny sentencepiece vocabulary (1000) + 7 added tokens; make_tiny
# replaces it with what the tokenizer it writes actually has.
CONFIGS: dict[str, LegionConfig] = {
    "tiny": LegionConfig(
        name="tiny",
        vocab_size=1007,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        intermediate_size=172,
        clip_hidden_size=64,
        clip_num_layers=3,
        clip_num_heads=4,
        clip_intermediate_size=256,
        sam_embed_dim=32,
        sam_depth=2,
        sam_num_heads=2,
        sam_window_size=14,
        sam_global_attn_indexes=(1,),
        torch_dtype="bfloat16",
    ),
    "small": LegionConfig(
        name="small",
        vocab_size=1007,
        hidden_size=512,
        num_layers=6,
        num_heads=8,
        num_kv_heads=8,
        intermediate_size=1376,
        clip_hidden_size=256,
        clip_num_layers=6,
        clip_num_heads=4,
        clip_intermediate_size=1024,
        sam_embed_dim=128,
        sam_depth=4,
        sam_num_heads=4,
        sam_window_size=14,
        sam_global_attn_indexes=(1, 3),
        torch_dtype="bfloat16",
    ),
    # The LLM of "small" grown past the CPU's last-level cache (fp32 weights ~610 MB, ~20x a 32 MiB L3), so that
    # its decode is bandwidth-bound as the 7B's is; vision and SAM as "small". For the precision benchmark
    # (benchmarks/precision.py speed), not make-tiny.
    "legion-7b": LegionConfig(
        name="legion-7b",
        vocab_size=32007,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        intermediate_size=11008,
        clip_hidden_size=1024,
        clip_num_layers=24,
        clip_num_heads=16,
        clip_intermediate_size=4096,
        sam_embed_dim=1280,
        sam_depth=32,
        sam_num_heads=16,
        sam_window_size=14,
        sam_global_attn_indexes=(7, 15, 23, 31),
        torch_dtype="bfloat16",
    ),
}
# The LLM of "small" grown past the CPU's last-level cache (fp32 weights ~610 MB, ~20x a 32 MiB L3), so that its
# decode is bandwidth-bound as the 7B's is; vision and SAM as "small". For the precision benchmark
# (benchmarks/precision.py speed), not make-tiny.
CONFIGS["medium"] = dataclasses.replace(
    CONFIGS["small"],
    name="medium",
    hidden_size=1024,
    num_layers=12,
    num_heads=16,
    num_kv_heads=16,
    intermediate_size=2752,
)


# ---------------------------------------------------------------------------------------------------------------
# Reading sizes from files and tensor shapes.


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file (config, index, tokenizer files): an object, or CheckpointError naming it."""
    return read_json_object(path, CheckpointError)


def sam_encoder_dims(shapes: Mapping[str, tuple[int, ...]], prefix: str = SAM_ENCODER_PREFIX) -> dict:
    """SAM ViT sizes from tensor shapes alone.

    patch_embed.proj.weight [C, 3, p, p] -> width C, patch p; pos_embed [1, g, g, C] -> image g*p;
    blocks.N.* -> depth; blocks.N.attn.rel_pos_h [2*S-1, head_dim] -> heads = C / head_dim, and S is the
    attention span of the block: S = g for global blocks, S = window otherwise; blocks.N.mlp.lin1 [mlp, C];
    neck.0.weight [out, C, 1, 1].
    """

    def get(key: str) -> tuple[int, ...]:
        if prefix + key not in shapes:
            raise CheckpointError(f"SAM image encoder tensor missing from the checkpoint: {prefix + key}")
        return tuple(shapes[prefix + key])

    width, _, patch, _ = get("patch_embed.proj.weight")
    _, grid, _, _ = get("pos_embed")
    block_ids = sorted(
        {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k))}
    )
    if not block_ids or block_ids != list(range(len(block_ids))):
        raise CheckpointError(f"SAM image encoder blocks are missing or not numbered 0..N-1: {block_ids}")
    spans = []
    head_dim = None
    for i in block_ids:
        length, hd = get(f"blocks.{i}.attn.rel_pos_h")
        if head_dim is not None and hd != head_dim:
            raise CheckpointError(
                f"{prefix}blocks.{i}.attn.rel_pos_h: head dim {hd} differs from block 0's {head_dim}"
            )
        head_dim = hd
        spans.append((length + 1) // 2)
    global_blocks = tuple(i for i, s in zip(block_ids, spans, strict=True) if s == grid)
    windows = {s for s in spans if s != grid}
    if len(windows) > 1:
        raise CheckpointError(f"SAM image encoder: blocks use several window sizes {sorted(windows)}")
    if width % head_dim:
        raise CheckpointError(f"SAM image encoder: width {width} is not a multiple of head dim {head_dim}")
    mlp, _ = get("blocks.0.mlp.lin1.weight")
    out_chans = get("neck.0.weight")[0]
    return {
        "sam_embed_dim": width,
        "sam_depth": len(block_ids),
        "sam_num_heads": width // head_dim,
        # A model with only global blocks has no window; keep the SAM value, it is then unused.
        "sam_window_size": windows.pop() if windows else 14,
        "sam_global_attn_indexes": global_blocks,
        "sam_mlp_dim": mlp,
        "sam_patch_size": patch,
        "sam_image_size": grid * patch,
        "sam_out_chans": out_chans,
    }


def clip_vision_fields(clip_config: dict) -> dict:
    """The vision part of a CLIP config.json: a full CLIPModel config (nested vision_config) or a
    CLIPVisionModel config (fields at top level). Absent fields take transformers' CLIPVisionConfig defaults."""
    from transformers import CLIPVisionConfig

    vision = clip_config.get("vision_config", clip_config)
    if not isinstance(vision, dict):
        raise CheckpointError("CLIP config.json: vision_config is not an object")
    known = {k: v for k, v in vision.items() if k in _CLIP_FIELDS}
    vc = CLIPVisionConfig(**known)
    return {
        "clip_hidden_size": vc.hidden_size,
        "clip_num_layers": vc.num_hidden_layers,
        "clip_num_heads": vc.num_attention_heads,
        "clip_intermediate_size": vc.intermediate_size,
        "clip_image_size": vc.image_size,
        "clip_patch_size": vc.patch_size,
        "clip_hidden_act": vc.hidden_act,
        "clip_layer_norm_eps": vc.layer_norm_eps,
    }


_CLIP_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
    "num_channels",
    "projection_dim",
)


def clip_preprocess_fields(preprocessor: dict | None) -> dict:
    """Mean/std from preprocessor_config.json (the crop size must equal the tower's image size)."""
    if not preprocessor:
        return {}
    out = {}
    if "image_mean" in preprocessor:
        out["clip_mean"] = tuple(float(x) for x in preprocessor["image_mean"])
    if "image_std" in preprocessor:
        out["clip_std"] = tuple(float(x) for x in preprocessor["image_std"])
    for k in ("clip_mean", "clip_std"):
        if k in out and len(out[k]) != 3:
            raise CheckpointError(f"CLIP preprocessor_config.json: {k[5:]} must have 3 values, got {out[k]}")
    return out


def crop_size_of(preprocessor: dict) -> int | None:
    crop = preprocessor.get("crop_size")
    if isinstance(crop, dict):
        crop = crop.get("height", crop.get("shortest_edge"))
    return int(crop) if crop is not None else None


_ARCH_FIELDS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "intermediate_size",
    "clip_hidden_size",
    "clip_num_layers",
    "clip_num_heads",
    "clip_intermediate_size",
    "sam_embed_dim",
    "sam_depth",
    "sam_num_heads",
    "sam_window_size",
    "sam_global_attn_indexes",
)


def registry_name(cfg: LegionConfig) -> str | None:
    """The CONFIGS size with the same architecture (vocabulary aside), or None."""
    for size, ref in CONFIGS.items():
        if all(getattr(cfg, f) == getattr(ref, f) for f in _ARCH_FIELDS):
            return size
    return None


def config_from_sources(
    checkpoint_config: dict,
    clip_config: dict,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    preprocessor: dict | None = None,
    added_tokens: dict | None = None,
    name: str | None = None,
) -> LegionConfig:
    """Build the LegionConfig of a checkpoint.

    checkpoint_config: the checkpoint's config.json (GLaMM/LLaVA fields); clip_config: the CLIP directory's
    config.json; shapes: checkpoint key -> tensor shape (the LLM's and SAM's keys); preprocessor: CLIP's
    preprocessor_config.json; added_tokens: the checkpoint's added_tokens.json (checked against the vocab);
    name: the model's name, default the registry size whose architecture this is (e.g. "tiny"), else "checkpoint".
    """
    c = checkpoint_config

    def need(key: str):
        if key not in c:
            raise CheckpointError(f"checkpoint config.json: field '{key}' is missing")
        return c[key]

    fields = {
        "name": name or "checkpoint",
        "vocab_size": int(need("vocab_size")),
        "hidden_size": int(need("hidden_size")),
        "num_layers": int(need("num_hidden_layers")),
        "num_heads": int(need("num_attention_heads")),
        "num_kv_heads": int(c.get("num_key_value_heads") or need("num_attention_heads")),
        "intermediate_size": int(need("intermediate_size")),
        "rms_norm_eps": float(c.get("rms_norm_eps", 1e-5)),
        "rope_theta": float(c.get("rope_theta", 10000.0)),
        "max_position_embeddings": int(c.get("max_position_embeddings", 4096)),
        "out_dim": int(c.get("out_dim", 256)),
        "clip_select_layer": int(c.get("mm_vision_select_layer", -2)),
        "torch_dtype": str(c.get("torch_dtype", "bfloat16")),
        "bos_token_id": int(c.get("bos_token_id") if c.get("bos_token_id") is not None else 1),
        "eos_token_id": int(c.get("eos_token_id") if c.get("eos_token_id") is not None else 2),
    }
    scaling = c.get("rope_scaling")
    if scaling:
        raise CheckpointError(
            f"checkpoint config.json: rope_scaling {scaling} is not supported (LEGION uses none)"
        )
    fields.update(clip_vision_fields(clip_config))
    fields.update(clip_preprocess_fields(preprocessor))
    if (
        preprocessor
        and (crop := crop_size_of(preprocessor)) is not None
        and crop != fields["clip_image_size"]
    ):
        raise CheckpointError(
            f"CLIP preprocessor_config.json: crop size {crop} differs from the tower's image size {fields['clip_image_size']}"
        )
    mm_hidden = c.get("mm_hidden_size")
    if mm_hidden is not None and int(mm_hidden) != fields["clip_hidden_size"]:
        raise CheckpointError(
            f"checkpoint config.json: mm_hidden_size {mm_hidden} differs from the CLIP hidden size {fields['clip_hidden_size']}"
        )
    fields.update(sam_encoder_dims(shapes))
    if fields["num_heads"] <= 0 or fields["hidden_size"] % fields["num_heads"]:
        raise CheckpointError(
            f"checkpoint config.json: hidden_size {fields['hidden_size']} is not a multiple of num_attention_heads {fields['num_heads']}"
        )
    cfg = LegionConfig(**fields)
    if name is None and (size := registry_name(cfg)) is not None:
        cfg = cfg.replace(name=size)
    if added_tokens:
        expected = {tok: cfg.base_vocab_size + i for i, tok in enumerate(ADDED_TOKENS)}
        for tok, idx in expected.items():
            if added_tokens.get(tok) != idx:
                raise CheckpointError(
                    f"added_tokens.json: {tok} has id {added_tokens.get(tok)}, expected {idx} (vocab_size {cfg.vocab_size})"
                )
    return cfg
