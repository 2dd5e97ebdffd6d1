"""The reference pipeline: LEGION's published inference semantics end to end, in PyTorch fp32 on CPU.

This is the oracle of every parity test and the baseline of the end-to-end benchmark
(docs/REFERENCE.md; original code: opendatalab/LEGION ``scripts/loc_exp/infer.py``,
``model/Legion.py`` ``evaluate``, ``model/llava/llava_with_region_arch.py``, ``scripts/cls/eval.py``).

Two decoding modes, same model, same greedy rule:

* ``use_kv_cache=False`` (benchmark baseline (a)) runs like the original: every step rebuilds the whole input
  (prompt prefix ids, 576 projected image embeddings, suffix ids, generated ids), re-runs CLIP + projector,
  runs the LLM over the whole sequence, computes logits for every position, takes the argmax of the last.
  The [SEG] hidden states come, as in ``LegionForCausalLM.evaluate``, from the LAST step's full forward pass,
  indexed with the original's ``cat(zeros(575), ids[:, 1:] == SEG)`` mask.
* ``use_kv_cache=True`` (benchmark baseline (b)) is eager PyTorch with transformers' ``DynamicCache``: CLIP once,
  one prefill, one position per decode step; the [SEG] hidden state is the one output by the step whose logits
  produced the [SEG] (for the first generated token: the last prefill position).

Masks follow ``evaluate`` + ``infer.py``: ``text_hidden_fcs`` -> prompt encoder -> mask decoder (``model.mask_head``),
then SAM ``postprocess_masks`` (bilinear to 1024, crop to the resized size (h', w'), bilinear to (H, W)), ``> 0``.
As in the original, the SAM image encoder runs after generation, and all masks are made at once at the end.

Every stage is a public method so ``benchmarks/e2e.py`` can time it on its own:
``load_image``, ``preprocess``, ``vision``, ``sam_encode``, ``nocache_step``, ``prefill``, ``decode_step``,
``masks``; ``run`` chains them and reports per-stage seconds in ``ReferenceOutput.timings``.
"""

from __future__ import annotations

import inspect
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from legion_rt.errors import CheckpointError, ImageError, RequestError

# The image placeholder id of LLaVA's ``tokenizer_image_token`` (tools/utils.py IMAGE_TOKEN_INDEX).
IMAGE_TOKEN_INDEX = -200

# SAM's fixed constants (segment-anything / LEGION eval/utils.py grounding_image_ecoder_preprocess).
SAM_SIZE = 1024
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)

# OpenAI CLIP defaults, used only when the CLIP directory has no preprocessor_config.json.
CLIP_SIZE = 336
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------------------------
# Image decoding
# ----------------------------------------------------------------------------------------------------------------


def load_image(image: str | Path | bytes | np.ndarray) -> np.ndarray:
    """Decode a picture the way the reference does and return RGB uint8 [H, W, 3] (C-contiguous).

    A path or encoded bytes go through OpenCV (``cv2.imread`` / ``cv2.imdecode`` with the default IMREAD_COLOR,
    which applies EXIF orientation, drops alpha, replicates gray and turns 16-bit into 8-bit), then BGR -> RGB,
    exactly as ``infer.py`` does. An ndarray must already be RGB uint8 [H, W, 3] and is used as is.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ImageError(
                f"image array must be RGB uint8 [H, W, 3], got {image.dtype} {list(image.shape)}"
            )
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ImageError(f"image array is empty: shape {list(image.shape)}")
        return np.ascontiguousarray(image)

    import cv2  # export/test dependency only (opencv-python-headless)

    if isinstance(image, (bytes, bytearray)):
        buf = np.frombuffer(bytes(image), dtype=np.uint8)
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
        name = f"<{len(image)} bytes>"
    elif isinstance(image, (str, Path)):
        name = str(image)
        if not Path(name).is_file():
            raise ImageError(f"image file not found: {name}")
        bgr = cv2.imread(name)
    else:
        raise ImageError(f"unsupported image input type: {type(image).__name__}")
    if bgr is None or bgr.size == 0:
        raise ImageError(f"cannot decode image: {name}")
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing (Pillow, like transformers' CLIPImageProcessor and segment-anything's ResizeLongestSide)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreprocessConstants:
    """The two branches' constants. CLIP ones come from the CLIP directory's ``preprocessor_config.json``."""

    clip_resize: int = CLIP_SIZE  # shortest side after the bicubic resize
    clip_crop: int = CLIP_SIZE  # center crop, square
    clip_rescale: float = 1 / 255
    clip_mean: tuple[float, float, float] = CLIP_MEAN
    clip_std: tuple[float, float, float] = CLIP_STD
    sam_size: int = SAM_SIZE
    sam_mean: tuple[float, float, float] = SAM_MEAN
    sam_std: tuple[float, float, float] = SAM_STD

    @classmethod
    def from_clip_dir(cls, clip_dir: str | Path) -> PreprocessConstants:
        """Read ``preprocessor_config.json`` (old int form ``"size": 336`` or dict form ``{"shortest_edge": 336}``)."""
        path = Path(clip_dir) / "preprocessor_config.json"
        if not path.is_file():
            return cls()
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path}: unreadable preprocessor config ({err})") from err

        def side(value: Any, key: str) -> int:
            if isinstance(value, dict):
                value = value.get("shortest_edge", value.get("height"))
            if not isinstance(value, int) or value <= 0:
                raise CheckpointError(f"{path}: unsupported {key} {value!r}")
            return value

        for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if cfg.get(flag, True) is False:
                raise CheckpointError(
                    f"{path}: {flag}=false is not supported (LEGION's CLIP preprocessing uses it)"
                )
        resize = side(cfg.get("size", CLIP_SIZE), "size")
        crop = side(cfg.get("crop_size", resize), "crop_size")
        if crop > resize:
            # transformers would pad here; LEGION's CLIP config never does that.
            raise CheckpointError(f"{path}: crop_size {crop} larger than size {resize} is not supported")
        mean = tuple(float(x) for x in cfg.get("image_mean", CLIP_MEAN))
        std = tuple(float(x) for x in cfg.get("image_std", CLIP_STD))
        if len(mean) != 3 or len(std) != 3:
            raise CheckpointError(f"{path}: image_mean/image_std must have 3 values")
        return cls(
            clip_resize=resize,
            clip_crop=crop,
            clip_rescale=float(cfg.get("rescale_factor", 1 / 255)),
            clip_mean=mean,  # type: ignore[arg-type]
            clip_std=std,  # type: ignore[arg-type]
        )


def clip_resize_shape(height: int, width: int, shortest: int) -> tuple[int, int]:
    """(h, w) after transformers' shortest-edge resize: short side = ``shortest``, long = int(shortest*long/short)."""
    if width <= height:
        return int(shortest * height / width), shortest
    return shortest, int(shortest * width / height)


def sam_resize_shape(height: int, width: int, longest: int = SAM_SIZE) -> tuple[int, int]:
    """(h', w') of segment-anything's ``ResizeLongestSide.get_preprocess_shape``: int(x * scale + 0.5)."""
    scale = longest * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def clip_preprocess(rgb: np.ndarray, consts: PreprocessConstants = PreprocessConstants()) -> torch.Tensor:
    """RGB uint8 [H, W, 3] -> CLIP pixels f32 [1, 3, crop, crop].

    As transformers' CLIPImageProcessor (4.28 and the 5.x Pillow backend): Pillow bicubic resize of the uint8 picture
    (no reducing gap), center crop with top = (h - crop) // 2, rescale uint8 * (1/255) in float64 then float32,
    normalize in float32. Every picture is HxWx3 (the 4.28 channels-first guess for 1- or 3-pixel-tall pictures is
    deliberately not reproduced).
    """
    h, w = rgb.shape[:2]
    nh, nw = clip_resize_shape(h, w, consts.clip_resize)
    resized = np.asarray(Image.fromarray(rgb, mode="RGB").resize((nw, nh), resample=Image.Resampling.BICUBIC))
    crop = consts.clip_crop
    top, left = (nh - crop) // 2, (nw - crop) // 2
    cropped = resized[top : top + crop, left : left + crop]  # [crop, crop, 3] uint8
    scaled = (cropped.astype(np.float64) * consts.clip_rescale).astype(np.float32)
    mean = np.asarray(consts.clip_mean, dtype=np.float32)
    std = np.asarray(consts.clip_std, dtype=np.float32)
    normed = (scaled - mean) / std  # float32 arithmetic, as transformers' normalize on a float32 array
    return torch.from_numpy(np.ascontiguousarray(normed.transpose(2, 0, 1)))[None]


def sam_preprocess(
    rgb: np.ndarray, consts: PreprocessConstants = PreprocessConstants()
) -> tuple[torch.Tensor, tuple[int, int]]:
    """RGB uint8 [H, W, 3] -> (SAM pixels f32 [1, 3, 1024, 1024], resized size (h', w')).

    ``ResizeLongestSide.apply_image``: Pillow bilinear resize of the uint8 picture to (h', w') (torchvision's resize
    of a PIL image is ``PIL.Image.resize``); then LEGION's ``grounding_image_ecoder_preprocess``: (x - mean) / std
    in float32 on 0..255 values, zero padding at the bottom and right up to 1024 x 1024.
    """
    h, w = rgb.shape[:2]
    nh, nw = sam_resize_shape(h, w, consts.sam_size)
    resized = np.array(Image.fromarray(rgb, mode="RGB").resize((nw, nh), resample=Image.Resampling.BILINEAR))
    x = torch.from_numpy(resized).permute(2, 0, 1)  # [3, h', w'] uint8
    mean = torch.tensor(consts.sam_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(consts.sam_std, dtype=torch.float32).view(3, 1, 1)
    x = (x - mean) / std  # uint8 - float32 -> float32
    x = F.pad(x, (0, consts.sam_size - nw, 0, consts.sam_size - nh))
    return x[None].contiguous(), (nh, nw)


def postprocess_masks(
    low_res: torch.Tensor,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    sam_size: int = SAM_SIZE,
) -> torch.Tensor:
    """SAM ``postprocess_masks`` on logits: [N, 256, 256] -> [N, H, W] float logits (threshold with ``> 0``).

    Bilinear (align_corners=False) to sam_size x sam_size, crop to input_size (h', w'), bilinear to original_size.
    """
    x = F.interpolate(low_res[:, None].float(), (sam_size, sam_size), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    x = F.interpolate(x, tuple(original_size), mode="bilinear", align_corners=False)
    return x[:, 0]


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Preprocessed:
    """Both branches' inputs for one picture."""

    clip_pixels: torch.Tensor  # [1, 3, 336, 336] f32
    sam_pixels: torch.Tensor  # [1, 3, 1024, 1024] f32
    resize_size: tuple[int, int]  # (h', w') of the SAM branch
    original_size: tuple[int, int]  # (H, W)


@dataclass
class VisionOutput:
    """One CLIP pass: projected patch embeddings for the LLM and the detector's logits."""

    image_embeds: torch.Tensor  # [1, 576, H]
    cls_logits: torch.Tensor | None  # [1, 2] (index 0 = fake, 1 = real) or None without a detector


@dataclass
class KVState:
    """The KV-cached decoder's state for one request."""

    cache: Any  # transformers DynamicCache
    length: int  # positions held by the cache


@dataclass
class ReferenceOutput:
    """Everything the reference produces for one picture.

    ``text`` is the answer exactly as ``infer.py`` has it before the explanation clean-up (decoded, ``\\n`` removed,
    double spaces replaced once, split at the last ``"ASSISTANT: "``): this is ``Result.text`` of the runtime.
    ``decoded`` is the raw decode of prompt ids (without -200) + generated ids.
    """

    token_ids: list[int]  # generated ids, each [SEG] included, EOS included when produced
    decoded: str
    text: str
    explanation: str
    phrases: list[str]  # infer.py's <p>...</p> phrases (stripped)
    mask_phrases: list[str | None]  # one per [SEG]: reference_pair_phrases (the phrase before it)
    seg_positions: list[int]  # per [SEG]: position in the embedded sequence whose hidden state made the mask
    seg_hidden: torch.Tensor  # [N, H] final-norm last-layer hidden states
    low_res: torch.Tensor  # [N, 256, 256] mask logits
    masks: np.ndarray  # bool [N, H, W]
    mask: np.ndarray  # bool [H, W], union (all False when N == 0)
    cls_logits: torch.Tensor | None  # [2]
    fake_probability: float | None  # softmax(cls_logits)[0]
    verdict: str | None  # "fake" | "real" (argmax, a tie goes to index 0 = fake)
    resize_size: tuple[int, int]
    original_size: tuple[int, int]
    prompt_length: int  # embedded prompt positions (prefix + 576 + suffix)
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds: preprocess, vision (first CLIP+projector+detector pass), sam_encoder, prefill (first LLM pass),
    decode (every later step; in no-cache mode this includes the per-step CLIP re-runs), masks (mask head +
    upsampling), total, time_to_first_token, time_to_first_mask (both from the start of ``run``; NaN without a
    mask), decode_tokens (number of decode steps after the first token) and ms_per_token (decode / decode_tokens,
    0 when there is none)."""


# ----------------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptIds:
    """Prompt ids split at the image: prefix (BOS first, up to <im_start>), suffix (from <im_end>)."""

    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]

    @property
    def full_ids(self) -> list[int]:
        """The ids as ``tokenizer_image_token`` returns them, with -200 where the image goes."""
        return [*self.prefix_ids, IMAGE_TOKEN_INDEX, *self.suffix_ids]


class ReferencePipeline:
    """LEGION end to end in PyTorch fp32 (see the module docstring).

    ``model`` is an ``export.model.legion.LegionModel`` (fp32, eval mode). ``prompt`` holds the 4.28-exact prompt
    ids; ``seg_id``/``eos_id`` the [SEG] and </s> ids; ``decode`` maps ids to text by the slow LlamaTokenizer's rules
    (``skip_special_tokens=False``); each [SEG]'s phrase comes from ``reference_pair_phrases`` over that ``decode``.
    Use ``from_checkpoint`` to build all of it from the released layout.
    """

    def __init__(
        self,
        *,
        model: Any,
        prompt: PromptIds,
        seg_id: int,
        eos_id: int,
        decode: Callable[[list[int]], str],
        preprocess: PreprocessConstants = PreprocessConstants(),
    ) -> None:
        self.model = model
        self.prompt = prompt
        self.seg_id = int(seg_id)
        self.eos_id = int(eos_id)
        self.decode = decode
        self.consts = preprocess
        llm = model.llm
        self._embed = llm.get_input_embeddings()
        self._decoder = llm.model  # LlamaModel: its last_hidden_state is after the final RMSNorm
        self._lm_head = llm.lm_head
        # transformers 5.x renamed LlamaModel.forward's ``past_key_values`` to ``cache`` (old name deprecated).
        params = inspect.signature(self._decoder.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        with torch.no_grad():
            self._prefix_embeds = self._embed(torch.tensor([prompt.prefix_ids]))  # [1, P0, H]

    # ---- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        clip: str | Path,
        detector: str | Path | None = None,
        *,
        model: Any = None,
        attn_implementation: str = "eager",
    ) -> ReferencePipeline:
        """Load the released layout (or a make-tiny one): model (fp32), prompt ids, tokenizer rules, CLIP constants.

        ``attn_implementation`` is transformers' attention kernel ("eager" = the matmul-softmax of the original's
        transformers 4.28 LLaMA; "sdpa" is faster for benchmarks). ``model`` skips loading (an already built
        LegionModel of this checkpoint)."""
        from . import tokenizer as tok

        if model is None:
            from .checkpoint import load_legion

            model = load_legion(checkpoint, clip, detector=detector, attn_implementation=attn_implementation)
        model.eval()
        prompt = _prompt_from(tok.prompt_ids(checkpoint))
        special = _special_ids(tok, checkpoint)
        decode = tok.SlowLlamaTokenizer.from_dir(checkpoint).decode
        return cls(
            model=model,
            prompt=prompt,
            seg_id=special["seg"],
            eos_id=special["eos"],
            decode=decode,
            preprocess=PreprocessConstants.from_clip_dir(clip),
        )

    # ---- per-stage entry points (each one is what the benchmark times) -----------------------------------------

    def load_image(self, image: str | Path | bytes | np.ndarray) -> np.ndarray:
        """Decode like ``cv2.imread`` + BGR->RGB; RGB uint8 [H, W, 3]."""
        return load_image(image)

    def preprocess(self, rgb: np.ndarray) -> Preprocessed:
        """RGB uint8 [H, W, 3] -> both branches' pixels (Pillow, see ``clip_preprocess`` / ``sam_preprocess``)."""
        clip_pixels = clip_preprocess(rgb, self.consts)
        sam_pixels, resize_size = sam_preprocess(rgb, self.consts)
        return Preprocessed(clip_pixels, sam_pixels, resize_size, (int(rgb.shape[0]), int(rgb.shape[1])))

    @torch.no_grad()
    def vision(self, clip_pixels: torch.Tensor) -> VisionOutput:
        """CLIP up to the penultimate layer + projector (+ detector head on the CLS token)."""
        patches, cls_token = self.model.clip_features(clip_pixels)  # [1, 576, Cv], [1, Cv]
        image_embeds = self.model.project(patches)  # [1, 576, H]
        return VisionOutput(image_embeds, self.model.detect(cls_token))

    @torch.no_grad()
    def sam_encode(self, sam_pixels: torch.Tensor) -> torch.Tensor:
        """SAM image encoder: [1, 3, 1024, 1024] -> [1, 256, 64, 64]."""
        return self.model.sam_encode(sam_pixels)

    @torch.no_grad()
    def inputs_embeds(self, image_embeds: torch.Tensor, generated: list[int]) -> torch.Tensor:
        """[1, P0 + 576 + P1 + G, H]: prefix ids, image embeddings, suffix ids + generated ids (embedded)."""
        tail = torch.tensor([[*self.prompt.suffix_ids, *generated]], dtype=torch.long)
        return torch.cat([self._prefix_embeds, image_embeds, self._embed(tail)], dim=1)

    @torch.no_grad()
    def nocache_step(
        self, clip_pixels: torch.Tensor, generated: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of the original's decoding: CLIP + projector again, the LLM over the whole sequence, the logits
        of every position (as the original's ``lm_head(outputs[0])``). Returns (logits of the last position [V],
        final-norm hidden states of every position [S, H])."""
        # The original's LLM path (LlavaLlamaForCausalLM.forward -> encode_images) has no detector: CLIP + projector.
        image_embeds = self.model.project(self.model.clip_features(clip_pixels)[0])  # [1, 576, H]
        hidden = self._decoder(inputs_embeds=self.inputs_embeds(image_embeds, generated), use_cache=False)
        hidden = hidden.last_hidden_state  # [1, S, H]
        logits = self._lm_head(hidden)  # [1, S, V]
        return logits[0, -1], hidden[0]

    @torch.no_grad()
    def prefill(self, image_embeds: torch.Tensor) -> tuple[KVState, torch.Tensor, torch.Tensor]:
        """KV-cached prefill of the whole prompt. Returns (state, logits [V], hidden [H]) of the last position."""
        from transformers import DynamicCache

        cache = _new_cache(DynamicCache, self.model.llm.config)
        embeds = self.inputs_embeds(image_embeds, [])
        out = self._decoder(inputs_embeds=embeds, use_cache=True, **{self._cache_kw: cache})
        h = out.last_hidden_state[0, -1]  # [H]
        return KVState(cache, embeds.shape[1]), self._lm_head(h), h

    @torch.no_grad()
    def decode_step(self, state: KVState, token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one token to the KV cache. Returns (logits [V], hidden [H]) of that position."""
        embeds = self._embed(torch.tensor([[token_id]], dtype=torch.long))  # [1, 1, H]
        out = self._decoder(inputs_embeds=embeds, use_cache=True, **{self._cache_kw: state.cache})
        state.length += 1  # the DynamicCache grew in place
        h = out.last_hidden_state[0, -1]
        return self._lm_head(h), h

    @torch.no_grad()
    def masks(
        self,
        seg_hidden: torch.Tensor,
        image_embedding: torch.Tensor,
        resize_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> tuple[torch.Tensor, np.ndarray]:
        """[N, H] [SEG] hidden states -> (low-res logits [N, 256, 256], bool masks [N, H, W])."""
        if seg_hidden.shape[0] == 0:
            low = torch.zeros((0, *self.model.cfg.low_res_hw), dtype=torch.float32)
            return low, np.zeros((0, *original_size), dtype=bool)
        low = self.model.mask_head(seg_hidden, image_embedding)  # [N, 256, 256]
        up = postprocess_masks(low, resize_size, original_size, self.consts.sam_size)
        return low, (up > 0).numpy()

    # ---- whole runs --------------------------------------------------------------------------------------------

    def run(
        self,
        image: str | Path | bytes | np.ndarray,
        *,
        max_new_tokens: int = 512,
        use_kv_cache: bool = False,
        ignore_eos: bool = False,
    ) -> ReferenceOutput:
        """Analyze one picture. ``ignore_eos`` (benchmarks only) keeps decoding to ``max_new_tokens``."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        t: dict[str, float] = {}
        t0 = time.perf_counter()

        rgb = self.load_image(image)
        pre = self.preprocess(rgb)
        t["preprocess"] = time.perf_counter() - t0

        if use_kv_cache:
            gen = self._generate_kv(pre.clip_pixels, max_new_tokens, ignore_eos, t, t0)
        else:
            gen = self._generate_nocache(pre.clip_pixels, max_new_tokens, ignore_eos, t, t0)
        token_ids, seg_hidden, seg_positions, cls_logits = gen

        s = time.perf_counter()
        image_embedding = self.sam_encode(pre.sam_pixels)
        t["sam_encoder"] = time.perf_counter() - s

        s = time.perf_counter()
        low_res, masks = self.masks(seg_hidden, image_embedding, pre.resize_size, pre.original_size)
        union = masks.any(axis=0) if masks.shape[0] else np.zeros(pre.original_size, dtype=bool)
        t["masks"] = time.perf_counter() - s
        t["time_to_first_mask"] = time.perf_counter() - t0 if masks.shape[0] else float("nan")

        decoded, text, explanation, phrases, mask_phrases = self._text(token_ids)
        t["total"] = time.perf_counter() - t0

        fake_probability = verdict = None
        logits = None
        if cls_logits is not None:
            logits = cls_logits[0]
            fake_probability = float(torch.softmax(logits.double(), dim=0)[0])
            verdict = "fake" if int(torch.argmax(logits)) == 0 else "real"
        return ReferenceOutput(
            token_ids=token_ids,
            decoded=decoded,
            text=text,
            explanation=explanation,
            phrases=phrases,
            mask_phrases=mask_phrases,
            seg_positions=seg_positions,
            seg_hidden=seg_hidden,
            low_res=low_res,
            masks=masks,
            mask=union,
            cls_logits=logits,
            fake_probability=fake_probability,
            verdict=verdict,
            resize_size=pre.resize_size,
            original_size=pre.original_size,
            prompt_length=self.prompt_length,
            timings=t,
        )

    @property
    def num_image_tokens(self) -> int:
        """Image embeddings spliced into the prompt (576 for CLIP ViT-L/14 at 336 px)."""
        return int(self.model.cfg.num_image_tokens)

    @property
    def prompt_length(self) -> int:
        """Embedded prompt positions: prefix + image embeddings + suffix."""
        return len(self.prompt.prefix_ids) + self.num_image_tokens + len(self.prompt.suffix_ids)

    def _generate_nocache(
        self, clip_pixels: torch.Tensor, max_new_tokens: int, ignore_eos: bool, t: dict, t0: float
    ) -> tuple[list[int], torch.Tensor, list[int], torch.Tensor | None]:
        """The original's loop: each step = CLIP + projector + LLM over the whole sequence + full logits."""
        # The detector is a separate script in the reference (scripts/cls/eval.py, same CLIP preprocessing and the
        # same frozen CLIP); here it is timed as part of the first vision pass.
        s = time.perf_counter()
        cls_logits = self.vision(clip_pixels).cls_logits
        t["vision"] = time.perf_counter() - s

        generated: list[int] = []
        hidden = None
        decode_time, steps = 0.0, 0
        for step in range(max_new_tokens):
            s = time.perf_counter()
            logits, hidden = self.nocache_step(clip_pixels, generated)
            token = int(torch.argmax(logits))
            generated.append(token)
            if step == 0:
                t["prefill"] = time.perf_counter() - s
                t["time_to_first_token"] = time.perf_counter() - t0
            else:
                decode_time += time.perf_counter() - s
                steps += 1
            if token == self.eos_id and not ignore_eos:
                break
        t["decode"] = decode_time
        t["decode_tokens"] = float(steps)
        t["ms_per_token"] = 1000 * decode_time / steps if steps else 0.0

        # LegionForCausalLM.evaluate: seg mask over ids[:, 1:] with 575 leading zeros (hard-coded there; = image
        # tokens - 1), applied to the LAST step's hidden states (which cover every position but the last generated
        # token's). ids[i] sits at embedded position i + 575 when i is after the image, so mask position i - 1 + 575
        # is the position before it: the one whose logits produced it.
        ids = torch.tensor([*self.prompt.full_ids, *generated])
        lead = torch.zeros(self.num_image_tokens - 1, dtype=torch.bool)
        seg_mask = torch.cat([lead, ids[1:] == self.seg_id])
        assert seg_mask.shape[0] == hidden.shape[0], (seg_mask.shape, hidden.shape)
        positions = torch.nonzero(seg_mask)[:, 0].tolist()
        return generated, hidden[seg_mask], positions, cls_logits

    def _generate_kv(
        self, clip_pixels: torch.Tensor, max_new_tokens: int, ignore_eos: bool, t: dict, t0: float
    ) -> tuple[list[int], torch.Tensor, list[int], torch.Tensor | None]:
        """Eager KV-cached greedy loop: CLIP once, prefill, one position per step."""
        s = time.perf_counter()
        vis = self.vision(clip_pixels)
        t["vision"] = time.perf_counter() - s

        s = time.perf_counter()
        state, logits, h = self.prefill(vis.image_embeds)
        generated: list[int] = []
        seg_hidden: list[torch.Tensor] = []
        positions: list[int] = []
        decode_time, steps = 0.0, 0
        for step in range(max_new_tokens):
            token = int(torch.argmax(logits))
            generated.append(token)
            if step == 0:
                t["prefill"] = time.perf_counter() - s
                t["time_to_first_token"] = time.perf_counter() - t0
            if token == self.seg_id:
                seg_hidden.append(h)  # the hidden state of the position whose logits produced this [SEG]
                positions.append(state.length - 1)
            if (token == self.eos_id and not ignore_eos) or step == max_new_tokens - 1:
                break
            s = time.perf_counter()
            logits, h = self.decode_step(state, token)
            decode_time += time.perf_counter() - s
            steps += 1
        t["decode"] = decode_time
        t["decode_tokens"] = float(steps)
        t["ms_per_token"] = 1000 * decode_time / steps if steps else 0.0
        hidden_dim = self.model.llm.config.hidden_size
        stacked = torch.stack(seg_hidden) if seg_hidden else torch.zeros((0, hidden_dim))
        return generated, stacked, positions, vis.cls_logits

    def _text(self, token_ids: list[int]) -> tuple[str, str, str, list[str], list[str | None]]:
        """infer.py's text post-processing on decode(prompt ids without -200 + generated ids)."""
        ids = [*self.prompt.prefix_ids, *self.prompt.suffix_ids, *token_ids]
        decoded = self.decode(ids)
        text, explanation, phrases = reference_postprocess(decoded)
        prompt = [*self.prompt.prefix_ids, *self.prompt.suffix_ids]
        mask_phrases = reference_pair_phrases(self.decode, prompt, token_ids, self.seg_id)
        return decoded, text, explanation, phrases, mask_phrases


def reference_postprocess(decoded: str) -> tuple[str, str, list[str]]:
    """``infer.py`` lines 82-96, transcribed: (answer text, explanation, phrases)."""
    text = decoded.replace("\n", "").replace("  ", " ")
    text = text.split("ASSISTANT: ")[-1]
    cleaned = re.sub(r"<.*?>", "", text)
    phrases = [p.strip() for p in re.findall(r"<p>(.*?)<\/p>", text)]
    cleaned = cleaned.replace("[SEG]", "")
    cleaned = " ".join(cleaned.split()).strip("'").strip()
    return text, cleaned, phrases


def reference_pair_phrases(
    decode: Callable[[list[int]], str], prompt_ids: list[int], generated_ids: list[int], seg_id: int
) -> list[str | None]:
    """The phrase of each [SEG] token of ``generated_ids`` (one entry per occurrence, in order), by the original
    pairing rule over infer.py's post-processing. legion_rt.text.pair_phrases implements the same rule on its own
    (over tokenizer.json, tracking offsets through the replaces); this is its oracle and shares no code with it.

    ``decode(ids)`` is the reference's decode (the slow tokenizer's). The text of ``prompt_ids + generated_ids``
    goes through infer.py's steps (newlines removed, one "  " -> " " pass, the text after the last "ASSISTANT: ") to
    the answer text; the phrases are the matches of ``<p>(.*?)</p>`` on it. A [SEG] gets the last match that starts
    before the [SEG]'s own text, stripped; None when no match starts before it, or when the [SEG] lies before the
    answer.

    The [SEG]'s offset comes from decoding the ids up to and including that token: 4.28's decode makes every added
    token its own sub-text, so the decoded prefix ends with "[SEG]" and is a prefix of the whole decode (checked);
    a "[SEG]" spelled by ordinary pieces is never taken for the token. The text before the [SEG] goes through the
    same two replaces: no "\n" or "  " can straddle the "[" that follows it, so its length is the [SEG]'s offset in
    the processed text.
    """

    def steps_2_3(text: str) -> str:
        return text.replace("\n", "").replace("  ", " ")

    ids = [int(i) for i in prompt_ids] + [int(i) for i in generated_ids]
    decoded = decode(ids)
    seg_text = decode([seg_id])
    text = steps_2_3(decoded)
    mark = text.rfind("ASSISTANT: ")
    answer_start = mark + len("ASSISTANT: ") if mark >= 0 else 0
    matches = [
        (answer_start + m.start(), m.group(1).strip())
        for m in re.finditer(r"<p>(.*?)<\/p>", text[answer_start:])
    ]
    out: list[str | None] = []
    for i in range(len(prompt_ids), len(ids)):
        if ids[i] != seg_id:
            continue
        upto = decode(ids[: i + 1])
        if not (upto.endswith(seg_text) and decoded.startswith(upto)):
            raise AssertionError(
                f"decode of the ids up to [SEG] #{len(out)} is not a prefix of the whole decode"
            )
        pos = len(steps_2_3(upto[: len(upto) - len(seg_text)]))
        if text[pos : pos + len(seg_text)] != seg_text:
            raise AssertionError(f"[SEG] #{len(out)} is not at offset {pos} of the post-processed text")
        before = [phrase for start, phrase in matches if start < pos]
        out.append(before[-1] if pos >= answer_start and before else None)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Glue to the other export modules (their APIs are described in docs/FORMAT.md)
# ----------------------------------------------------------------------------------------------------------------


def _new_cache(cache_cls: Any, config: Any) -> Any:
    try:
        return cache_cls(config=config)
    except TypeError:  # older transformers: DynamicCache()
        return cache_cls()


def _prompt_from(ids: Any) -> PromptIds:
    """export.tokenizer.prompt_ids' (prefix_ids, suffix_ids) pair as a PromptIds."""
    prefix, suffix = ids
    if IMAGE_TOKEN_INDEX in prefix or IMAGE_TOKEN_INDEX in suffix:
        raise CheckpointError(
            f"prompt ids: the image index {IMAGE_TOKEN_INDEX} must not appear in prefix or suffix"
        )
    return PromptIds(tuple(int(i) for i in prefix), tuple(int(i) for i in suffix))


def _special_ids(tok: Any, checkpoint: str | Path) -> dict[str, int]:
    """[SEG] and </s> ids as infer.py reads them (export.tokenizer.special_token_ids)."""
    ids = tok.special_token_ids(checkpoint)
    return {"seg": int(ids["seg"]), "eos": int(ids["eos"])}
