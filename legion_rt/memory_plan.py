"""Memory plan of a LEGION deployment: bytes of every graph's weights, the KV cache and an activation estimate,
for a precision and a ``max_new_tokens``, from an artifact directory's manifest or from sizes alone (a registry
size of export/config.py, e.g. the 7B). No torch, no onnx: arithmetic on the model's sizes.

    plan_memory("art-dir", max_new_tokens=512)                      # the manifest's precision and files
    plan_memory(CONFIGS["legion-7b"], "int4", max_new_tokens=512)   # any object with LegionConfig's fields
    plan.total, plan.fits(8 * GiB), plan.max_new_tokens_within(8 * GiB)

What is counted (README "Precision"; tests/test_memory_plan.py checks it against exported files):

* ``llm``: llm.onnx's weights. Linear layers (packed QKV, o_proj, gate/up/down, lm_head) at the precision's
  bytes per weight; int8/int4 (MatMulNBits, export/quantize.py) add one float32 scale per block (and packed zero
  points when not symmetric), lm_head at its own bits; RMSNorm weights and the rotary cos/sin tables
  ([max_positions, head_dim/2] x 2) are float32 (fp16 in an fp16 graph).
* ``embed_tokens``: the [V, H] table (fp32 in an fp32 export, else fp16); the runtime maps it and reads the rows it
  needs, so the resident part is smaller; counted whole, as an upper bound.
* ``vision``, ``sam_encoder``, ``mask_head``: from the manifest, their files' bytes; from sizes, their parameter
  counts (CLIP up to the selected layer + projector + detector; SAM ViT; text_hidden_fcs + SAM's prompt encoder
  and mask decoder, which with its constants is ``MASK_HEAD_FIXED_BYTES`` in every size) at 4 bytes (2 in fp16).
* ``kv_cache``: 2 (K, V) x layers x kv_heads x head_dim x (prompt + max_new_tokens) x the KV dtype's bytes.
* ``activations``: an estimate, not a measurement: the largest of (a) the LLM prefill (hidden states, the QKV and
  MLP intermediates and one layer's attention scores [heads, S, S] in float32 over the image prompt) and (b) the
  SAM encoder (one global-attention block's scores [heads, 4096, 4096] + 4 copies of the [64x64, C] tokens),
  plus the mask head's output and ONNX Runtime's arena slack (``ACTIVATION_SLACK``). Real peaks depend on the
  provider's allocator.

Not counted: the Python process, ONNX Runtime and CUDA libraries, the OS (on Jetson the CPU and GPU share the
module's memory: leave 1.5-2.5 GB for them; README "Precision" does).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GiB = 1024**3
PRECISION_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}
QUANT_DEFAULTS = {"int8": (8, 32, True, 8), "int4": (4, 32, True, 8)}  # bits, block, symmetric, lm_head bits
# SAM prompt encoder + mask decoder (the same in every LEGION size) as exported in mask_head.onnx, with the
# constants the export folds in (get_dense_pe [256, 64, 64], no_mask_embed broadcast): mask_head.onnx of the tiny
# export (14 616 179 bytes, 2026-11-29) minus its text_hidden_fcs (H=64: 20 800 float32).
MASK_HEAD_FIXED_BYTES = 14_616_179 - 20_800 * 4
ACTIVATION_SLACK = 256 * 1024**2
DEFAULT_TEXT_PROMPT = 150  # prompt positions besides the image tokens, for a plan from sizes (tiny: 36 + 110)


@dataclass(frozen=True)
class Sizes:
    """The sizes the plan needs (a subset of LegionConfig / the manifest's model block)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    num_image_tokens: int = 576
    prompt_length: int = 576 + DEFAULT_TEXT_PROMPT
    clip_hidden_size: int = 1024
    clip_layers: int = 23  # layers run (up to the selected hidden state)
    clip_intermediate_size: int = 4096
    clip_patch: int = 14
    detector_hidden: int | None = 2048
    sam_embed_dim: int = 1280
    sam_depth: int = 32
    sam_num_heads: int = 16
    sam_mlp: int = 5120
    sam_window: int = 14
    sam_global: int = 4
    sam_grid: int = 64
    sam_patch: int = 16
    sam_out_chans: int = 256
    out_dim: int = 256


@dataclass
class MemoryPlan:
    """Bytes per part; ``total`` sums them. ``graphs``: weights per graph (and the embedding table)."""

    precision: str
    max_new_tokens: int
    prompt_length: int
    graphs: dict[str, int]
    kv_cache: int
    activations: int
    kv_bytes_per_position: int
    max_positions: int = 1 << 62
    notes: list[str] = field(default_factory=list)

    @property
    def weights(self) -> int:
        return sum(self.graphs.values())

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    def fits(self, budget: int) -> bool:
        return self.total <= budget

    def max_new_tokens_within(self, budget: int) -> int:
        """The largest max_new_tokens whose plan fits ``budget`` (0 when not even the prompt fits), at most what
        the model's positions allow."""
        room = budget - self.weights - self.activations - self.prompt_length * self.kv_bytes_per_position
        fit = max(0, room // self.kv_bytes_per_position) if room > 0 else 0
        return int(min(fit, self.max_positions - self.prompt_length))

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.graphs.items())
        return (
            f"{self.precision}: weights {self.weights / GiB:.2f} GiB ({parts}) + KV cache {self.kv_cache / GiB:.2f} "
            f"GiB ({self.prompt_length} + {self.max_new_tokens} positions) + activations ~{self.activations / GiB:.2f}"
            f" GiB = {self.total / GiB:.2f} GiB"
        )


# ------------------------------------------------------------------------------------------------ the parts
def llm_weight_bytes(s: Sizes, precision: str, quant: tuple | None = None, kv_float16: bool = False) -> int:
    """llm.onnx's weights (see the module docstring)."""
    H, L, D, V = s.hidden_size, s.num_layers, s.head_dim, s.vocab_size
    qkv_out = (s.num_heads + 2 * s.num_kv_heads) * D
    mats = [(H, qkv_out), (s.num_heads * D, H), (H, s.intermediate_size), (H, s.intermediate_size),
            (s.intermediate_size, H)]  # fmt: skip
    small_dtype = 2 if precision == "fp16" else 4
    norms = (2 * L + 1) * H * small_dtype
    rotary = 2 * s.max_position_embeddings * (D // 2) * 4  # cos/sin caches stay float32
    if precision in ("fp32", "fp16"):
        per = PRECISION_BYTES[precision]
        n = L * sum(k * m for k, m in mats) + H * V
        return int(n * per) + norms + rotary

    bits, block, symmetric, head_bits = quant or QUANT_DEFAULTS[precision]

    def nbits(k: int, n: int, b: int) -> int:
        blocks = math.ceil(k / block)
        data = n * blocks * (block * b // 8)
        scales = n * blocks * 4
        zeros = 0 if symmetric else n * math.ceil(blocks * b / 8)
        return data + scales + zeros

    body = L * sum(nbits(k, m, bits) for k, m in mats)
    head = nbits(H, V, head_bits) if head_bits else H * V * 4
    return body + head + norms + rotary


def embed_bytes(s: Sizes, precision: str) -> int:
    return s.vocab_size * s.hidden_size * (4 if precision == "fp32" else 2)


def vision_params(s: Sizes) -> int:
    C, F, P = s.clip_hidden_size, s.clip_intermediate_size, s.clip_patch
    n_pos = s.num_image_tokens + 1
    emb = 3 * P * P * C + C + n_pos * C + 2 * C  # patch conv (no bias), class, positions, pre-LN
    layer = 4 * (C * C + C) + (C * F + F) + (F * C + C) + 4 * C
    proj = (C * s.hidden_size + s.hidden_size) + (s.hidden_size**2 + s.hidden_size)
    det = (C * s.detector_hidden + s.detector_hidden + s.detector_hidden * 2 + 2) if s.detector_hidden else 0
    return emb + s.clip_layers * layer + proj + det


def sam_params(s: Sizes) -> int:
    C, M, hd = s.sam_embed_dim, s.sam_mlp, s.sam_embed_dim // s.sam_num_heads
    emb = 3 * s.sam_patch**2 * C + C + s.sam_grid**2 * C
    block = 4 * C + (3 * C * C + 3 * C) + (C * C + C) + (C * M + M) + (M * C + C)
    rel = (s.sam_depth - s.sam_global) * 2 * (2 * s.sam_window - 1) * hd + s.sam_global * 2 * (
        2 * s.sam_grid - 1
    ) * hd
    neck = C * s.sam_out_chans + 2 * s.sam_out_chans + 9 * s.sam_out_chans**2 + 2 * s.sam_out_chans
    # torch.onnx folds the relative-position lookups (rel_pos[q - k], constant indices) into [S, S, hd] tables
    folded = (s.sam_depth - s.sam_global) * 2 * s.sam_window**2 * hd + s.sam_global * 2 * s.sam_grid**2 * hd
    return emb + s.sam_depth * block + rel + neck + folded


def mask_head_bytes(s: Sizes, per: int) -> int:
    fcs = (s.hidden_size**2 + s.hidden_size) + (s.hidden_size * s.out_dim + s.out_dim)
    return fcs * per + MASK_HEAD_FIXED_BYTES * per // 4


def kv_bytes_per_position(s: Sizes, kv_dtype: str) -> int:
    return 2 * s.num_layers * s.num_kv_heads * s.head_dim * (2 if kv_dtype == "float16" else 4)


def activation_bytes(s: Sizes, precision: str) -> int:
    S = s.prompt_length
    qkv = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
    llm = S * (4 * s.hidden_size + qkv + 3 * s.intermediate_size) * 4 + s.num_heads * S * S * 4
    llm += s.vocab_size * 4
    tokens = s.sam_grid**2
    sam = s.sam_num_heads * tokens * tokens * 4 + 4 * tokens * s.sam_embed_dim * 4
    mask = 4 * 1024 * 1024 * 4  # a few upsampled masks
    return max(llm, sam) + mask + ACTIVATION_SLACK


# ------------------------------------------------------------------------------------------------- sources
def sizes_from_config(cfg: Any, prompt_length: int | None = None) -> Sizes:
    """Sizes of a LegionConfig (export/config.py; duck-typed, so the runtime needs no export stage)."""
    return Sizes(
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings,
        num_image_tokens=cfg.num_image_tokens,
        prompt_length=prompt_length or cfg.num_image_tokens + DEFAULT_TEXT_PROMPT,
        clip_hidden_size=cfg.clip_hidden_size,
        clip_layers=cfg.clip_layers_needed,
        clip_intermediate_size=cfg.clip_intermediate_size,
        clip_patch=cfg.clip_patch_size,
        detector_hidden=cfg.detector_hidden,
        sam_embed_dim=cfg.sam_embed_dim,
        sam_depth=cfg.sam_depth,
        sam_num_heads=cfg.sam_num_heads,
        sam_mlp=cfg.sam_mlp,
        sam_window=cfg.sam_window_size,
        sam_global=len(cfg.sam_global_attn_indexes),
        sam_grid=cfg.sam_image_size // cfg.sam_patch_size,
        sam_patch=cfg.sam_patch_size,
        sam_out_chans=cfg.sam_out_chans,
        out_dim=cfg.out_dim,
    )


def _registry(name: str):
    from legion_rt.export.config import CONFIGS  # the size registry lives with the export stage

    if name not in CONFIGS:
        raise ValueError(f"unknown size {name!r}: one of {', '.join(CONFIGS)}")
    return CONFIGS[name]


def plan_memory(
    source: Any,
    precision: str | None = None,
    *,
    max_new_tokens: int = 512,
    kv_dtype: str | None = None,
    prompt_length: int | None = None,
    other_precision: str | None = None,
) -> MemoryPlan:
    """The plan for ``source``: an artifact directory (path), a ``legion_rt.manifest.Manifest`` (with its
    directory's files when given as a path), a registry size name (``"legion-7b"``) or a LegionConfig.
    ``precision`` defaults to the manifest's (required otherwise); ``kv_dtype`` to the manifest's, else float16
    for an fp16 plan and float32 otherwise (what the export writes). ``other_precision``: the vision, SAM and
    mask graphs' precision when it differs from what the export writes (fp16 for fp16, fp32 otherwise)."""
    from .manifest import Manifest

    manifest, root = None, None
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        from .artifacts import read_json_object
        from .errors import ArtifactError

        root = Path(source)
        manifest = Manifest.from_json(read_json_object(root / "manifest.json", ArtifactError))
    elif isinstance(source, Manifest):
        manifest = source
    elif isinstance(source, str):
        source = _registry(source)

    if manifest is not None:
        m = manifest.model
        base = Sizes(hidden_size=0, num_layers=0, num_heads=0, num_kv_heads=0, head_dim=0, intermediate_size=0,
                     vocab_size=0, max_position_embeddings=0)  # fmt: skip
        try:  # a registry size (tiny, small, ...): its CLIP / SAM sizes, which the manifest does not carry
            base = sizes_from_config(_registry(m.name))
        except (ValueError, ImportError):  # a real checkpoint: LEGION's (CLIP ViT-L, SAM ViT-H) defaults
            pass
        s = dataclasses.replace(
            base,
            hidden_size=m.hidden_size,
            num_layers=m.num_layers,
            num_heads=m.num_heads,
            num_kv_heads=m.num_kv_heads,
            head_dim=m.head_dim,
            intermediate_size=m.intermediate_size,
            vocab_size=m.vocab_size,
            max_position_embeddings=m.max_position_embeddings,
            num_image_tokens=m.num_image_tokens,
            prompt_length=prompt_length or manifest.prompt_length,
            clip_hidden_size=m.clip_hidden_size,
        )
        precision = precision or manifest.precision
        llm = manifest.graphs.llm
        kv_dtype = kv_dtype or llm.kv_dtype
        quant = None
        if llm.quant is not None and precision == manifest.precision:
            q = llm.quant
            quant = (
                q.bits,
                q.block_size,
                q.symmetric,
                (q.lm_head_bits or q.bits) if q.lm_head_quantized else 0,
            )
    else:
        if precision is None:
            raise ValueError("precision is required for a plan from sizes")
        s = sizes_from_config(source, prompt_length)
        kv_dtype = kv_dtype or ("float16" if precision == "fp16" else "float32")
        quant = None
    if precision not in PRECISION_BYTES:
        raise ValueError(f"precision {precision!r}: one of {', '.join(PRECISION_BYTES)}")
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")

    graphs = {"llm": llm_weight_bytes(s, precision, quant), "embed_tokens": embed_bytes(s, precision)}
    notes = []
    same_files = manifest is not None and root is not None and precision == manifest.precision
    per = 2 if precision == "fp16" else 4  # quantized exports keep these graphs float32
    if other_precision is not None:  # what-if: vision/SAM/mask graphs in this precision (fp32 | fp16)
        per = 2 if other_precision == "fp16" else 4
        same_files = same_files and other_precision == getattr(manifest.graphs.vision, "precision", None)
    for name in ("vision", "sam_encoder", "mask_head"):
        if same_files:
            g = getattr(manifest.graphs, name)
            graphs[name] = sum(e.bytes for f, e in manifest.files.items() if f in (g.file, g.file + ".data"))
        elif name == "vision":
            graphs[name] = vision_params(s if manifest is None else _no_detector(s, manifest.detector)) * per
        elif name == "sam_encoder":
            graphs[name] = sam_params(s) * per
        else:
            graphs[name] = mask_head_bytes(s, per)
    per_pos = kv_bytes_per_position(s, kv_dtype)
    return MemoryPlan(
        precision=precision,
        max_new_tokens=int(max_new_tokens),
        prompt_length=s.prompt_length,
        graphs=graphs,
        kv_cache=per_pos * (s.prompt_length + int(max_new_tokens)),
        activations=activation_bytes(s, precision),
        kv_bytes_per_position=per_pos,
        max_positions=s.max_position_embeddings,
        notes=notes,
    )


def _no_detector(s: Sizes, detector: bool) -> Sizes:
    return s if detector else dataclasses.replace(s, detector_hidden=None)


_PLANS: dict = {}


def check_request_memory(art_root: Path, max_new_tokens: int, budget: int) -> None:
    """RequestError (one line, naming the numbers) when a request of ``max_new_tokens`` on the artifacts at
    ``art_root`` would not fit ``budget`` bytes: weights + activation estimate + KV cache (prompt + new tokens)."""
    from .errors import RequestError

    key = os.fspath(art_root)
    if key not in _PLANS:
        _PLANS[key] = plan_memory(art_root, max_new_tokens=0)
    plan = _PLANS[key]
    kv = plan.kv_bytes_per_position * (plan.prompt_length + int(max_new_tokens))
    need = plan.weights + plan.activations + kv
    if need > budget:
        fit = plan.max_new_tokens_within(budget)
        hint = f"max_new_tokens <= {fit} fits" if fit > 0 else "not even the prompt fits"
        raise RequestError(
            f"max_new_tokens={max_new_tokens}: needs {need / 2**20:.0f} MiB (weights {plan.weights / 2**20:.0f} + "
            f"activations ~{plan.activations / 2**20:.0f} + KV cache {kv / 2**20:.1f} MiB for "
            f"{plan.prompt_length}+{max_new_tokens} positions) > max_memory {budget / 2**20:.0f} MiB; {hint}"
        )
