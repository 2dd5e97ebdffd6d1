"""``manifest.json`` of an artifact directory, as typed dataclasses: the one definition of the format.

The export stage builds a ``Manifest`` from these types and writes ``manifest.to_json()``; the runtime parses it
once with ``Manifest.from_json`` (every field type-checked, one ``ArtifactError`` line naming the key at fault) and
passes the typed object on. Format and field meanings: docs/FORMAT.md "manifest.json".

Format version 2 (version 1 repeated the model sizes under ``graphs.llm`` and carried ``dtypes`` and ``text``
blocks that nothing read; a version-1 directory is refused with "re-export").
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import ArtifactError

FORMAT_NAME = "legion_rt.artifacts"
FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (FORMAT_VERSION,)
REQUIRED_GRAPHS = ("vision", "sam_encoder", "mask_head", "llm")
PRECISIONS = ("fp32", "fp16", "int8", "int4")
LLM_GRAPH_KINDS = ("gqa_shared_kv", "standard_kv")
IMAGE_TOKEN_INDEX = -200  # the placeholder id LLaVA's tokenizer_image_token puts where the image goes

# Normalisation constants of the released models (docs/REFERENCE.md "Preprocessing"): the one definition in the
# project (legion_rt.ops defaults, the export's manifest and test models read these). CLIP's are written into
# each manifest from the CLIP directory's preprocessor_config.json, so a checkpoint with other values still works.
CLIP_SIZE = 336
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_SIZE = 1024
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ModelInfo:
    """Sizes of the exported model (the LLM's, CLIP's and SAM's)."""

    name: str  # registry size ("tiny", "small", "legion-7b") or "checkpoint"
    hidden_size: int  # H
    num_layers: int
    num_heads: int
    num_kv_heads: int  # KVH
    head_dim: int  # D
    intermediate_size: int
    vocab_size: int  # V
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    clip_hidden_size: int  # Cv
    num_image_tokens: int  # 576 for CLIP ViT-L/14-336
    sam_embed_dim: int  # 256
    sam_embedding_hw: tuple[int, int]  # (64, 64)
    low_res_hw: tuple[int, int]  # (256, 256)


@dataclass(frozen=True)
class TokenIds:
    """Ids of the special and added tokens."""

    bos: int
    eos: int
    unk: int
    pad: int
    im_start: int
    im_end: int
    bbox: int
    point: int
    seg: int
    p_start: int
    p_end: int


@dataclass(frozen=True)
class Prompt:
    """The prompt's token ids around the image: prefix (BOS first), 576 image embeddings, suffix."""

    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]


@dataclass(frozen=True)
class Normalization:
    """One model's input picture: a ``size`` square after resizing, then (x / 255 - mean) / std per channel
    (CLIP) or (x - mean) / std on 0..255 values (SAM); see legion_rt.ops.preprocess."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class Preprocess:
    clip: Normalization  # shortest side to ``size`` (bicubic), centre crop ``size`` x ``size``
    sam: Normalization  # longest side to ``size`` (bilinear), pad to ``size`` x ``size``

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``legion_rt.ops.preprocess``."""
        return {
            "clip_size": self.clip.size,
            "clip_crop": (self.clip.size, self.clip.size),
            "clip_mean": self.clip.mean,
            "clip_std": self.clip.std,
            "sam_size": self.sam.size,
            "sam_mean": self.sam.mean,
            "sam_std": self.sam.std,
        }


@dataclass(frozen=True)
class Graph:
    """One ONNX graph file. ``precision``: the precision its weights are stored in."""

    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    precision: str = "fp32"
    exporter: str = ""  # how it was made ("dynamo", "torchscript", "hand-built")


@dataclass(frozen=True)
class Quantization:
    """How llm.onnx's linear weights were quantized (precision int8 / int4): weight-only, block-wise, by ONNX
    Runtime's ``MatMulNBitsQuantizer`` into ``com.microsoft.MatMulNBits`` nodes. Activations, norms, attention and
    the KV cache stay float32. The choices and the measurements behind them: export/quantize.py."""

    bits: int  # 8 | 4
    block_size: int  # weights per scale (and zero point) along the input dimension
    symmetric: bool  # no zero points (a scale per block only)
    lm_head_quantized: bool  # the output projection too (else it stays float32)
    lm_head_bits: int | None = (
        None  # its bits when quantized (may differ from ``bits``: int4 body, int8 lm_head)
    )
    accuracy_level: int = (
        0  # MatMulNBits accuracy_level: 0 = unset (fp32 compute), 4 = int8 compute on the CPU
    )
    method: str = "MatMulNBits"
    tool: str = "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer"


PRECISION_BITS = {"int8": 8, "int4": 4}


@dataclass(frozen=True)
class LlmGraph(Graph):
    """llm.onnx: how the runtime drives it (legion_rt/backends/ort_llm.py). Tensor names with ``{i}`` are per layer.

    ``kind`` "gqa_shared_kv": ONNX Runtime's GroupQueryAttention writes K/V in place into the one buffer bound as
    both ``past_*`` input and ``present_*`` output; ``seqlens_k`` = filled positions - 1, ``total_sequence_length``
    = filled positions (both after the call).

    ``kind`` "standard_kv": standard ONNX operators only (for TensorRT, export/onnx_llm_standard.py); past K/V
    [B, KVH, P, D] in, present [B, KVH, P + S, D] out, positions P .. P + S - 1 from the past's shape; no
    ``seqlens_k`` / ``total_sequence_length`` inputs."""

    kind: str = "gqa_shared_kv"
    kv_dtype: str = "float32"  # "float32" | "float16"
    inputs_embeds: str = "inputs_embeds"
    seqlens_k: str = "seqlens_k"
    total_sequence_length: str = "total_sequence_length"
    logits: str = "logits"
    hidden: str = "hidden"
    past_key: str = "past_key_values.{i}.key"
    past_value: str = "past_key_values.{i}.value"
    present_key: str = "present.{i}.key"
    present_value: str = "present.{i}.value"
    external_data: str | None = None  # the weights file next to llm.onnx when the graph passes 2 GB
    quant: Quantization | None = None  # precision int8 / int4 only: how the weights were quantized


@dataclass(frozen=True)
class Graphs:
    vision: Graph  # pixel_values f32 [B,3,336,336] -> image_embeds f32 [B,576,H] (+ cls_logits f32 [B,2])
    sam_encoder: Graph  # pixel_values f32 [1,3,1024,1024] -> image_embeddings f32 [1,256,64,64]
    mask_head: Graph  # seg_hidden f32 [N,H], image_embeddings -> low_res_masks f32 [N,256,256]
    llm: LlmGraph
    # A second LLM graph of kind "standard_kv" (export --llm-graph both): ONNX Runtime drives ``llm``, TensorRT
    # builds its engine from this one. Absent (null) otherwise.
    llm_standard: LlmGraph | None = None

    def items(self) -> list[tuple[str, Graph]]:
        """(name, graph) of every graph present (``llm_standard`` only when exported)."""
        return [(f.name, g) for f in dataclasses.fields(self) if (g := getattr(self, f.name)) is not None]

    def tensorrt_llm(self) -> tuple[str, LlmGraph] | None:
        """(name, graph) of the LLM graph TensorRT can build (kind "standard_kv"), or None."""
        for name in ("llm_standard", "llm"):
            g = getattr(self, name)
            if g is not None and g.kind == "standard_kv":
                return name, g
        return None


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """The whole manifest.json. ``files`` lists every file of the directory but manifest.json itself (relative
    POSIX paths); ``producer`` (versions of the exporting libraries) and ``verification`` (what the export
    measured per graph) are records for people, not read by the runtime."""

    precision: str  # the LLM's weights: "fp32" | "fp16" | "int8" | "int4"
    model: ModelInfo
    tokens: TokenIds
    prompt: Prompt
    preprocess: Preprocess
    detector: bool  # the vision graph has the cls_logits output
    graphs: Graphs
    files: dict[str, FileEntry]
    producer: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @property
    def prompt_length(self) -> int:
        """Positions the prompt takes: prefix + image tokens + suffix."""
        return len(self.prompt.prefix_ids) + self.model.num_image_tokens + len(self.prompt.suffix_ids)

    def to_json(self) -> dict[str, Any]:
        """The JSON document (format and version first)."""
        doc = _to_json(self)
        return {"format": doc.pop("format"), "format_version": doc.pop("format_version"), **doc}

    @classmethod
    def from_json(cls, doc: Any, where: str = "manifest.json") -> Manifest:
        """Parse and validate ``doc`` (the loaded JSON). Raises ``ArtifactError`` "``where``: key: problem"."""
        if not isinstance(doc, dict):
            raise ArtifactError(f"{where}: not a JSON object")
        if doc.get("format") != FORMAT_NAME:
            raise ArtifactError(f"{where}: format is {doc.get('format')!r}, expected {FORMAT_NAME!r}")
        version = doc.get("format_version")
        if type(version) is not int or version not in SUPPORTED_FORMAT_VERSIONS:  # not True, 2.0 or "2"
            raise ArtifactError(
                f"{where}: unknown format_version {version!r} (this legion_rt reads "
                f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); re-export with this version"
            )
        m = _parse(cls, doc, where, "")
        m.validate(where)
        return m

    def validate(self, where: str = "manifest.json") -> None:
        """Cross-field checks the types alone do not make."""

        def bad(key: str, msg: str) -> ArtifactError:
            return ArtifactError(f"{where}: {key}: {msg}")

        if self.precision not in PRECISIONS:
            raise bad("precision", f"{self.precision!r} is not one of {', '.join(PRECISIONS)}")
        for name, g in self.graphs.items():
            if g.precision not in PRECISIONS:
                raise bad(
                    f"graphs.{name}.precision", f"{g.precision!r} is not one of {', '.join(PRECISIONS)}"
                )
            if g.file not in self.files:
                raise bad(f"graphs.{name}.file", f"{g.file!r} is not listed (with a hash) under 'files'")
        for key, llm in (("llm", self.graphs.llm), ("llm_standard", self.graphs.llm_standard)):
            if llm is None:
                continue
            if llm.kind not in LLM_GRAPH_KINDS:
                raise bad(f"graphs.{key}.kind", f"{llm.kind!r} is not supported by this runtime")
            if llm.kv_dtype not in ("float32", "float16"):
                raise bad(f"graphs.{key}.kv_dtype", f"{llm.kv_dtype!r} must be float32 or float16")
        if self.graphs.llm_standard is not None and self.graphs.llm_standard.kind != "standard_kv":
            raise bad("graphs.llm_standard.kind", f"{self.graphs.llm_standard.kind!r}: must be 'standard_kv'")
        llm = self.graphs.llm
        if llm.precision != self.precision:
            raise bad("graphs.llm.precision", f"{llm.precision!r} differs from precision {self.precision!r}")
        bits = PRECISION_BITS.get(llm.precision)
        if bits is None and llm.quant is not None:
            raise bad("graphs.llm.quant", f"present, but precision {llm.precision!r} is not quantized")
        if bits is not None:
            if llm.quant is None:
                raise bad(
                    "graphs.llm.quant", f"missing: precision {llm.precision!r} needs the quantization record"
                )
            if llm.quant.bits != bits:
                raise bad(
                    "graphs.llm.quant.bits", f"{llm.quant.bits} does not match precision {llm.precision!r}"
                )
            if llm.quant.block_size < 16 or llm.quant.block_size & (llm.quant.block_size - 1):
                raise bad("graphs.llm.quant.block_size", f"{llm.quant.block_size} is not a power of 2 >= 16")
        m = self.model
        for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
            if getattr(m, key) < 1:
                raise bad(f"model.{key}", f"{getattr(m, key)} must be >= 1")
        if m.num_heads % m.num_kv_heads:
            raise bad("model.num_kv_heads", f"{m.num_kv_heads} does not divide num_heads {m.num_heads}")
        if self.prompt_length >= m.max_position_embeddings:
            raise bad(
                "model.max_position_embeddings",
                f"{m.max_position_embeddings} leaves no room after the {self.prompt_length}-position prompt",
            )
        for key, ids in (
            ("prompt.prefix_ids", self.prompt.prefix_ids),
            ("prompt.suffix_ids", self.prompt.suffix_ids),
            ("tokens", tuple(_to_json(self.tokens).values())),
        ):
            out = [i for i in ids if not 0 <= i < m.vocab_size]  # a negative id would index from the end
            if out:
                raise bad(key, f"token id {out[0]} outside [0, {m.vocab_size})")
        if not self.prompt.prefix_ids:
            raise bad("prompt.prefix_ids", "empty (the prompt starts with BOS)")
        for name, entry in self.files.items():
            if entry.bytes < 0:
                raise bad(f"files.{name}.bytes", "must be >= 0")
        for norm, key in ((self.preprocess.clip, "clip"), (self.preprocess.sam, "sam")):
            if norm.size < 1 or any(s == 0 for s in norm.std):
                raise bad(f"preprocess.{key}", "size must be >= 1 and std non-zero")


# ------------------------------------------------------------------------------------- generic (de)serialisation


def _to_json(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [_to_json(v) for v in obj]
    return obj


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _parse(tp: Any, value: Any, where: str, key: str) -> Any:
    """``value`` (from JSON) as type ``tp``; ``key`` is the dotted path for the error message."""

    def bad(expected: str) -> ArtifactError:
        shown = repr(value) if len(repr(value)) <= 40 else type(value).__name__
        return ArtifactError(f"{where}: {key or '(top level)'}: expected {expected}, got {shown}")

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad("an object")
        kwargs = {}
        for f in dataclasses.fields(tp):
            sub = f"{key}.{f.name}" if key else f.name
            if f.name in value:
                kwargs[f.name] = _parse(_hints(tp)[f.name], value[f.name], where, sub)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ArtifactError(f"{where}: {sub}: missing")
        return tp(**kwargs)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _parse(inner, value, where, key)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list):
            raise bad("a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_parse(args[0], v, where, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad(f"a list of {len(args)}")
        return tuple(
            _parse(a, v, where, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if origin is dict:
        _, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise bad("an object")
        return {str(k): _parse(vt, v, where, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if type(value) is not bool:
            raise bad("true or false")
        return value
    if tp is int:
        if type(value) is not int:  # a bool is an int to isinstance; 2.0 is not an id
            raise bad("an integer")
        return value
    if tp is float:
        if type(value) not in (int, float):
            raise bad("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    raise TypeError(f"manifest field type {tp!r} is not handled")  # pragma: no cover - a bug in this file
