"""Safe, strict, shard-by-shard loading of the released LEGION layout into a LegionModel.

Layouts read:
- checkpoint directory: `config.json` + `pytorch_model-0000K-of-0000N.bin` + `pytorch_model.bin.index.json`,
  or a single `pytorch_model.bin`, or `model*.safetensors` (+ `model.safetensors.index.json`);
  tokenizer files beside them (read by export/tokenizer.py, not here);
- CLIP directory: `config.json` (full CLIPModel with nested `vision_config`, or CLIPVisionModel),
  `model.safetensors` or `pytorch_model.bin` (or sharded + index), `preprocessor_config.json`;
- detector: a file (.bin / .safetensors) or a checkpoint directory holding `prediction_head.{0,2}.*`, bare or
  under a prefix (a full classifier checkpoint).

Safety: `.bin` files are pickles and are only read with `torch.load(weights_only=True, mmap=True)`; a file
that needs anything else is refused (CheckpointError), never loaded unsafely. `.safetensors` files are read by
the safetensors library, after their header length is checked against the file size (nothing is allocated for
a header the file cannot hold); the library validates every tensor's range before any tensor is read. Index
file names must stay inside the directory.

Strictness: every model tensor must come from exactly one file with the expected shape; an unknown key fails.
Skipped on purpose: `*.rotary_emb.inv_freq` (recomputed), `model.region_encoder.*` (unused at inference),
CLIP's text model / projections / `position_ids` and the tower layers past `mm_vision_select_layer`.

Memory: the model is built on the meta device (no weights allocated), every key and shape is checked from
file metadata first, then each shard is read, converted tensor by tensor into the target dtype and assigned;
the shard is released before the next one. For mmap'd `.bin` shards the pages of each source tensor are
dropped right after conversion, so peak memory stays near the size of the loaded model.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from legion_rt.errors import CheckpointError

from .config import LegionConfig, config_from_sources, read_json

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Metadata of one stored tensor (no data read)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


# ---------------------------------------------------------------------------------------------------------------
# Files of a weights directory


def _inside(directory: Path, name: str, index_file: Path) -> Path:
    """The file `name` of an index, refused unless it is a plain relative name resolving inside directory."""
    if (
        not isinstance(name, str)
        or not name
        or os.path.isabs(name)
        or "\\" in name
        or ".." in Path(name).parts
    ):
        raise CheckpointError(
            f"{index_file}: file name {name!r} is not a plain relative path inside {directory}"
        )
    root = directory.resolve()
    path = (directory / name).resolve()
    if not path.is_relative_to(root):
        raise CheckpointError(f"{index_file}: file name {name!r} resolves outside {directory} (to {path})")
    if not path.is_file():
        raise CheckpointError(f"{index_file}: shard {name!r} does not exist in {directory}")
    return path


def weight_files(directory: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The weight files of a directory and, when an index exists, its key -> file map.

    Preference (as transformers): safetensors index, single model.safetensors, .bin index, single
    pytorch_model.bin."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_file = directory / index_name
        if index_file.exists():
            index = read_json(index_file)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_file}: no 'weight_map' object")
            resolved: dict[str, Path] = {}
            by_name: dict[str, Path] = {}
            for key, name in weight_map.items():
                if name not in by_name:
                    by_name[name] = _inside(directory, name, index_file)
                resolved[key] = by_name[name]
            return sorted(set(by_name.values())), resolved
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (directory / single).is_file():
            return [directory / single], None
    raise CheckpointError(
        f"{directory}: no weights found (expected pytorch_model.bin.index.json, model.safetensors.index.json, "
        "model.safetensors or pytorch_model.bin)"
    )


# ---------------------------------------------------------------------------------------------------------------
# Reading one file


def _check_safetensors_size(path: Path) -> None:
    """The header length (the file's first 8 bytes) against the file size and MAX_SAFETENSORS_HEADER, before the
    safetensors library reads (and allocates) the header."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
    if len(head) < 8:
        raise CheckpointError(f"{path}: truncated safetensors file (no header)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_SAFETENSORS_HEADER or 8 + n > size:
        raise CheckpointError(f"{path}: safetensors header length {n} is invalid for a {size}-byte file")


@contextmanager
def _safe_open(path: Path):
    """safetensors.safe_open (PyTorch tensors) after _check_safetensors_size; the library's errors become
    CheckpointErrors naming the file. It refuses a file whose tensors do not exactly cover the data after the
    header (a truncated file), overlapping or inconsistent ranges, and malformed headers."""
    from safetensors import SafetensorError, safe_open

    _check_safetensors_size(path)
    try:
        f = safe_open(str(path), framework="pt")
    except SafetensorError as e:
        if "incomplete metadata" in str(e):  # the tensors' ranges and the file's size disagree
            raise CheckpointError(f"{path}: truncated or padded safetensors file ({e})") from None
        raise CheckpointError(f"{path}: invalid safetensors file ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
    with f:
        yield f


def read_safetensors_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """key -> (dtype, shape) of a .safetensors file (no tensor data read); refuses dtypes LEGION does not use."""
    out = {}
    with _safe_open(path) as f:
        for key in f.keys():
            piece = f.get_slice(key)
            name = piece.get_dtype()
            if name not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {name}")
            out[key] = (SAFETENSORS_DTYPES[name], tuple(int(d) for d in piece.get_shape()))
    return out


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, only through torch's weights-only unpickler (memory-mapped, nothing copied)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # weights_only refusals, bad zip, truncation: all mean "not loadable safely"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: cannot be loaded safely as a weights-only PyTorch file ({first})"
        ) from None
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for nested in ("state_dict", "model", "module"):  # classifier checkpoints sometimes nest the weights
            if isinstance(obj.get(nested), dict):
                obj = obj[nested]
                break
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(f"{path}: not a state dict (a mapping of names to tensors)")
    return obj


def file_metadata(path: Path) -> dict[str, TensorInfo]:
    """key -> TensorInfo of one weight file, without reading tensor data."""
    if path.suffix == ".safetensors":
        return {
            k: TensorInfo(shape, dtype, path) for k, (dtype, shape) in read_safetensors_header(path).items()
        }
    state = _load_bin(path)
    _check_bin_storage(path, state)
    return {k: TensorInfo(tuple(t.shape), t.dtype, path) for k, t in state.items()}


def _check_bin_storage(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Every tensor's storage must lie inside the mapped file (a truncated zip is refused by torch.load
    already; this also guards against reading past the end through the memory map)."""
    size = path.stat().st_size
    for key, t in state.items():
        if t.untyped_storage().nbytes() > size:
            raise CheckpointError(f"{path}: truncated or corrupt: tensor {key!r} is larger than the file")


_libc = None


def _drop_pages(t: torch.Tensor) -> None:
    """Tell the kernel the memory-mapped pages fully inside tensor t are not needed any more (Linux).

    Only whole pages inside [data, data + nbytes) are dropped, and only for tensors of a read-only use of a
    private file mapping (torch.load mmap=True): if touched again they are re-read from the file."""
    global _libc
    if not hasattr(os, "sysconf") or os.name != "posix":
        return
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _libc = False
    if not _libc:
        return
    page = mmap.PAGESIZE
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first = (start + page - 1) // page * page
    last = end // page * page
    if last > first:
        _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED


def iter_file_tensors(path: Path, keys: set[str], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor converted to dtype, freshly allocated) for each key of `keys` in one weight file."""
    if path.suffix == ".safetensors":
        with _safe_open(path) as f:
            for key in sorted(keys):
                src = f.get_tensor(key)  # a copy out of the library's memory map
                yield key, src if src.dtype == dtype else src.to(dtype)
                del src
        return
    state = _load_bin(path)
    _check_bin_storage(path, state)
    try:
        for key in keys:
            src = state[key]
            dst = torch.empty(src.shape, dtype=dtype)
            try:
                dst.copy_(src)
            except RuntimeError as e:  # e.g. SIGBUS-free short reads surface as errors on some systems
                raise CheckpointError(f"{path}: cannot read tensor {key!r} ({e})") from None
            _drop_pages(src)
            yield key, dst
    finally:
        del state


def directory_metadata(directory: Path) -> dict[str, TensorInfo]:
    """key -> TensorInfo over all weight files of a directory, checked against its index."""
    files, index = weight_files(directory)
    infos: dict[str, TensorInfo] = {}
    for path in files:
        for key, info in file_metadata(path).items():
            if key in infos:
                raise CheckpointError(f"{path}: tensor {key!r} is also stored in {infos[key].file.name}")
            infos[key] = info
    if index is not None:
        for key, path in index.items():
            if key not in infos:
                raise CheckpointError(f"{path}: tensor {key!r} listed in the index is missing from this file")
            if infos[key].file != path:
                raise CheckpointError(f"{infos[key].file}: tensor {key!r} is indexed in {path.name} instead")
        for key, info in infos.items():
            if key not in index:
                raise CheckpointError(f"{info.file}: tensor {key!r} is not listed in the index")
    return infos


# ---------------------------------------------------------------------------------------------------------------
# Name mapping: file key -> LegionModel parameter name (None = skipped on purpose)

_LLM_KEY = re.compile(r"^(model\.embed_tokens\.|model\.layers\.\d+\.|model\.norm\.|lm_head\.)")


def checkpoint_key_to_param(key: str) -> str | None:
    if key.endswith("rotary_emb.inv_freq") or key.startswith("model.region_encoder."):
        return None
    for prefix, target in (
        ("model.mm_projector.", "mm_projector."),
        ("model.text_hidden_fcs.", "text_hidden_fcs."),
        ("model.grounding_encoder.", "grounding_encoder."),
    ):
        if key.startswith(prefix):
            return target + key[len(prefix) :]
    if _LLM_KEY.match(key):
        return "llm." + key
    return "?" + key  # unknown: reported by the strict check


_CLIP_IGNORED = re.compile(r"^(text_model\.|text_projection\.|visual_projection\.|logit_scale$)")


def clip_key_to_param(key: str, cfg: LegionConfig, vision_prefixed: bool) -> str | None:
    """CLIP file key -> `clip.*` parameter (None for the text model, projections, position_ids and the layers
    past the selected hidden state)."""
    if _CLIP_IGNORED.match(key):
        return None
    if vision_prefixed:
        if not key.startswith("vision_model."):
            return "?" + key
        key = key[len("vision_model.") :]
    if key == "embeddings.position_ids":
        return None
    m = re.match(r"^encoder\.layers\.(\d+)\.", key)
    if m and int(m.group(1)) >= cfg.clip_layers_needed:
        if int(m.group(1)) >= cfg.clip_num_layers:
            return "?" + key
        return None
    return "clip." + key


_DETECTOR = re.compile(r"^(.*?)prediction_head\.(0|2)\.(weight|bias)$")


def detector_keys(infos: dict[str, TensorInfo], source: Path) -> dict[str, str]:
    """file key -> `prediction_head.*` parameter: the 4 detector tensors, bare or under one prefix."""
    by_prefix: dict[str, dict[str, str]] = {}
    for key in infos:
        m = _DETECTOR.match(key)
        if m:
            by_prefix.setdefault(m.group(1), {})[key] = f"prediction_head.{m.group(2)}.{m.group(3)}"
    complete = {p: keys for p, keys in by_prefix.items() if len(keys) == 4}
    if not complete:
        raise CheckpointError(f"{source}: no complete prediction_head.{{0,2}}.{{weight,bias}} tensors found")
    if len(complete) > 1:
        raise CheckpointError(f"{source}: several detector heads found under prefixes {sorted(complete)}")
    return next(iter(complete.values()))


# ---------------------------------------------------------------------------------------------------------------
# Config


def read_legion_config(
    checkpoint_dir: Path, clip_dir: Path, infos: dict[str, TensorInfo] | None = None
) -> LegionConfig:
    """LegionConfig from the checkpoint's config.json, the CLIP directory's config.json and
    preprocessor_config.json, added_tokens.json and tensor shapes."""
    checkpoint_dir, clip_dir = Path(checkpoint_dir), Path(clip_dir)
    if infos is None:
        infos = directory_metadata(checkpoint_dir)
    shapes = {k: v.shape for k, v in infos.items()}
    pre = clip_dir / "preprocessor_config.json"
    added = checkpoint_dir / "added_tokens.json"
    return config_from_sources(
        read_json(checkpoint_dir / "config.json"),
        read_json(clip_dir / "config.json"),
        shapes,
        preprocessor=read_json(pre) if pre.exists() else None,
        added_tokens=read_json(added) if added.exists() else None,
    )


# ---------------------------------------------------------------------------------------------------------------
# Loading


@dataclass
class _Plan:
    """Which file provides which parameter: file -> {file key: parameter name}."""

    per_file: dict[Path, dict[str, str]]


def _plan(model, sources: list[tuple[dict[str, TensorInfo], dict[str, str | None], Path]]) -> _Plan:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    provided: dict[str, tuple[str, Path]] = {}
    per_file: dict[Path, dict[str, str]] = {}
    for infos, mapping, _where in sources:
        for key, info in infos.items():
            if key not in mapping:
                continue
            param = mapping[key]
            if param is None:
                continue
            if param.startswith("?") or param not in expected:
                raise CheckpointError(f"{info.file}: unexpected tensor {key!r} (not part of LEGION)")
            if param in provided:
                raise CheckpointError(
                    f"{info.file}: tensor {key!r} duplicates {provided[param][0]!r} of {provided[param][1]}"
                )
            if info.shape != expected[param]:
                raise CheckpointError(
                    f"{info.file}: tensor {key!r} has shape {list(info.shape)}, the model expects {list(expected[param])}"
                )
            if not info.dtype.is_floating_point:
                raise CheckpointError(f"{info.file}: tensor {key!r} has non-float dtype {info.dtype}")
            provided[param] = (key, info.file)
            per_file.setdefault(info.file, {})[key] = param
    missing = sorted(set(expected) - set(provided))
    if missing:
        where = _origin_of(missing[0], sources)
        raise CheckpointError(
            f"{where}: tensor {_file_key_of(missing[0])!r} is missing ({len(missing)} missing in all)"
        )
    return _Plan(per_file)


def _file_key_of(param: str) -> str:
    """The key a parameter has in its file (for messages)."""
    if param.startswith("llm."):
        return param[4:]
    if param.startswith("clip."):
        return "vision_model." + param[5:]
    if param.startswith("prediction_head."):
        return param
    return "model." + param


def _origin_of(param: str, sources) -> Path:
    """The directory or file a missing parameter should have come from, for the error message."""
    kind = param.split(".", 1)[0]
    order = {"clip": 1, "prediction_head": 2}.get(kind, 0)
    return sources[min(order, len(sources) - 1)][2]


def _assign(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:  # pragma: no cover - the plan only holds names of model.state_dict()
        raise CheckpointError(f"internal: {name} is neither a parameter nor a buffer")


def _clip_sources(clip_dir: Path, cfg: LegionConfig):
    infos = directory_metadata(clip_dir)
    prefixed = any(k.startswith("vision_model.") for k in infos)
    return infos, {k: clip_key_to_param(k, cfg, prefixed) for k in infos}


def _detector_sources(detector: Path):
    detector = Path(detector)
    if detector.is_dir():
        files, index = weight_files(detector)
        if index is not None:  # read only the file(s) holding the head
            files = sorted({p for k, p in index.items() if _DETECTOR.match(k)}) or files
        infos = {}
        for path in files:
            infos.update(file_metadata(path))
    elif detector.is_file():
        infos = file_metadata(detector)
    else:
        raise CheckpointError(f"{detector}: detector file not found")
    return infos, detector_keys(infos, detector)


def _is_streamed(param: str) -> bool:
    """LLM parameters left to StreamedLlmWeights by load_legion(stream_llm=True): all but the embedding table."""
    return param.startswith("llm.") and not param.startswith("llm.model.embed_tokens.")


class StreamedLlmWeights:
    """The LLM's weights read one tensor at a time from the checkpoint files, for a model loaded with
    ``stream_llm=True`` (its decoder layers, norm and lm_head stay on the meta device).

    ``weights["model.layers.3.mlp.up_proj.weight"]`` (LlamaForCausalLM state-dict names) returns a fresh float32
    copy; the mapped pages of the source are released at once, so reading all 7B weights in turn never holds
    more than one tensor. ``get(name)`` returns None for a tensor the checkpoint does not have (biases)."""

    def __init__(self, sources: dict[str, tuple[str, Path]]):
        self._sources = sources  # llm state-dict name -> (file key, file)
        self._maps: dict[Path, dict[str, torch.Tensor]] = {}

    def keys(self):
        return self._sources.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._sources

    def get(self, name: str, default=None):
        return self[name] if name in self._sources else default

    def __getitem__(self, name: str) -> torch.Tensor:
        key, path = self._sources[name]
        if path.suffix == ".safetensors":
            with _safe_open(path) as f:
                return f.get_tensor(key).to(torch.float32)
        src = self._mapped_file(path)[key]
        dst = torch.empty(src.shape, dtype=torch.float32)
        try:
            dst.copy_(src)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: cannot read tensor {key!r} ({e})") from None
        _drop_pages(src)
        return dst

    def mapped(self, name: str) -> torch.Tensor:
        """The stored tensor itself, in its file dtype, backed by the file's pages (a ``.bin`` shard: nothing is
        copied, the kernel pages it in and can drop it again), or a copy in its dtype (safetensors). For a
        PyTorch reference of a 7B that must not hold the weights in anonymous memory (benchmarks/full_size.py)."""
        key, path = self._sources[name]
        if path.suffix == ".safetensors":
            with _safe_open(path) as f:
                return f.get_tensor(key)
        return self._mapped_file(path)[key]

    def _mapped_file(self, path: Path) -> dict[str, torch.Tensor]:
        """The memory-mapped state dict of a ``.bin`` shard (nothing read yet), kept for its next tensors."""
        if path not in self._maps:
            state = _load_bin(path)
            _check_bin_storage(path, state)
            self._maps[path] = state
        return self._maps[path]

    def close(self) -> None:
        self._maps.clear()


def load_legion(
    checkpoint_dir,
    clip_dir,
    detector=None,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
    stream_llm: bool = False,
):
    """Load a LEGION checkpoint directory + CLIP directory (+ optional detector file) into a LegionModel.

    Every tensor is checked (presence, shape) from file metadata before any weight is read; weights are
    converted to `dtype` file by file. Raises CheckpointError with the key and file at fault.

    ``stream_llm``: load everything but the LLM's decoder layers, final norm and lm_head (the embedding table is
    loaded): those stay on the meta device and ``model.llm_weights`` (StreamedLlmWeights) reads them one at a
    time, as the export of a 7B LLM does (its float32 copy would not fit beside the rest)."""
    from .model.clip import fix_clip_buffers
    from .model.legion import LegionModel
    from .model.llm import fix_llm_buffers

    checkpoint_dir, clip_dir = Path(checkpoint_dir), Path(clip_dir)
    ckpt_infos = directory_metadata(checkpoint_dir)
    cfg = read_legion_config(checkpoint_dir, clip_dir, ckpt_infos)
    clip_infos, clip_map = _clip_sources(clip_dir, cfg)
    sources = [
        (ckpt_infos, {k: checkpoint_key_to_param(k) for k in ckpt_infos}, checkpoint_dir),
        (clip_infos, clip_map, clip_dir),
    ]
    if detector is not None:
        det_infos, det_map = _detector_sources(detector)
        sources.append((det_infos, det_map, Path(detector)))

    with torch.device("meta"):
        model = LegionModel(cfg, with_detector=detector is not None, attn_implementation=attn_implementation)
    plan = _plan(model, sources)
    streamed = {}
    for path, keys in plan.per_file.items():
        if stream_llm:
            streamed.update({p[4:]: (k, path) for k, p in keys.items() if _is_streamed(p)})
            keys = {k: p for k, p in keys.items() if not _is_streamed(p)}
        for key, value in iter_file_tensors(path, set(keys), dtype):
            _assign(model, keys[key], value)
    fix_llm_buffers(model.llm)
    fix_clip_buffers(model.clip)
    model.llm_weights = StreamedLlmWeights(streamed) if stream_llm else None
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                if t.is_meta and not (stream_llm and _is_streamed(n))]  # fmt: skip
    if leftover:  # pragma: no cover - _plan guarantees coverage of persistent tensors
        raise CheckpointError(f"{checkpoint_dir}: tensors never loaded: {leftover[:5]}")
    model.eval()
    model.requires_grad_(False)
    return model
