"""Native kernels of legion_rt (the compiled ``legion_rt._C``), with typed errors.

CPU entry points take and return numpy arrays; they run multithreaded with the GIL released.

* ``preprocess(rgb)``: uint8 [H, W, 3] C-contiguous -> (clip f32 [1, 3, 336, 336], sam f32 [1, 3, 1024, 1024],
  (h', w')). CLIP branch: Pillow bicubic resize of the shorter side to 336 (long side ``int(336*long/short)``),
  center crop (top = (H'-336)//2, left = (W'-336)//2), ``uint8 * (1/255)`` in float64 cast to float32, then
  ``(x - mean) / std`` in float32 (transformers 4.28 CLIPImageProcessor). SAM branch: ResizeLongestSide(1024)
  (``int(dim * 1024/max(H, W) + 0.5)``) with Pillow bilinear, ``(x - mean) / std`` in float32 on 0..255
  values, zero padded bottom/right. The resampling reproduces Pillow 13's fixed-point two-pass scheme
  byte-exactly (antialiasing when shrinking, pass order included).
* ``postprocess_masks(low_res, input_size, original_size, with_stats=False)``: float32 [N, h, w] logits ->
  bool [N, H, W], exactly SAM's ``postprocess_masks`` (bilinear, align_corners=False to 1024x1024, crop to
  input_size, bilinear to original_size, ``> 0``), fused (the 1024x1024 intermediate is never stored). With
  ``with_stats=True``: (masks, union bool [H, W], bboxes int64 [N, 4] (x0, y0, x1, y1) end-exclusive,
  (0, 0, 0, 0) for an empty mask, areas int64 [N]).
* ``cuda_available()``: built with CUDA and a CUDA device present. Never raises; importing this module makes
  no CUDA call.
* ``preprocess_cuda`` / ``postprocess_masks_cuda``: the same kernels on device memory (integer device
  pointers, e.g. from cuda-python's ``cudaMalloc``) enqueued on a stream handle (int, 0 = default stream).
  Asynchronous: synchronise the stream before reading the outputs.

Pass order: Pillow 13 runs the vertical resampling pass first when it shrinks the height and
``2 * (w - out_w) < h - out_h``; Pillow <= 12 always ran the horizontal pass first. The uint8 intermediate clips,
so the orders differ by a few steps on some bicubic pixels. ``pillow_order="auto"`` (default) follows the
installed Pillow; "13" or "12" force one.

Errors: a bad ``rgb`` argument raises :class:`legion_rt.errors.ImageError`; any other bad argument raises
:class:`legion_rt.errors.RequestError` (both are ``ValueError`` subclasses). Messages name the argument.
Threads: ``num_threads=None`` uses :func:`get_num_threads` (default: all cores, or ``LEGION_RT_NUM_THREADS``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .errors import ImageError, RequestError

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "legion_rt._C (the native core) is not built: run `pip install --no-build-isolation -e .` "
        f"or `pip install .` ({exc})"
    ) from exc

from .manifest import CLIP_MEAN, CLIP_STD, SAM_MEAN, SAM_STD  # noqa: E402  (defaults of preprocess)

_num_threads = 0


def _env_threads() -> int:
    raw = os.environ.get("LEGION_RT_NUM_THREADS", "")
    if raw.strip().isdigit():
        return int(raw)
    return 0


_num_threads = _env_threads()


def set_num_threads(n: int) -> None:
    """Threads the CPU kernels use by default (0 = all hardware threads)."""
    global _num_threads
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise RequestError(f"num_threads must be an int >= 0 (0 = all cores), got {n!r}")
    _num_threads = n


def get_num_threads() -> int:
    """The default thread count of the CPU kernels (0 = all hardware threads)."""
    return _num_threads


def _threads(n: int | None) -> int:
    if n is None:
        return _num_threads
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise RequestError(f"num_threads must be an int >= 0 (0 = all cores) or None, got {n!r}")
    return n


def _pillow13(order: str) -> bool:
    if order == "13":
        return True
    if order == "12":
        return False
    if order == "auto":
        try:
            import PIL

            return int(PIL.__version__.split(".")[0]) >= 13
        except Exception:
            return True
    raise RequestError(f"pillow_order must be 'auto', '13' or '12', got {order!r}")


def _convert(exc: Exception, image_arg: bool) -> Exception:
    msg = str(exc)
    if image_arg and msg.startswith("rgb"):
        return ImageError(msg)
    return RequestError(msg)


def preprocess(
    rgb: np.ndarray,
    *,
    clip_size: int = 336,
    clip_crop: Sequence[int] = (336, 336),
    clip_mean: Sequence[float] = CLIP_MEAN,
    clip_std: Sequence[float] = CLIP_STD,
    sam_size: int = 1024,
    sam_mean: Sequence[float] = SAM_MEAN,
    sam_std: Sequence[float] = SAM_STD,
    num_threads: int | None = None,
    pillow_order: str = "auto",
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """uint8 [H, W, 3] -> (clip f32 [1, 3, ch, cw], sam f32 [1, 3, S, S], (h', w')). See the module doc."""
    if not isinstance(rgb, np.ndarray):
        raise ImageError(f"rgb must be a numpy.ndarray of uint8 [H, W, 3], got {type(rgb).__name__}")
    try:
        clip, sam, size = _C.preprocess(
            rgb,
            clip_size,
            tuple(clip_crop),
            tuple(clip_mean),
            tuple(clip_std),
            sam_size,
            tuple(sam_mean),
            tuple(sam_std),
            _threads(num_threads),
            _pillow13(pillow_order),
        )
    except (ValueError, TypeError) as exc:
        raise _convert(exc, image_arg=True) from None
    return clip, sam, (int(size[0]), int(size[1]))


def preprocess_geometry(
    size: Sequence[int], *, clip_size: int = 336, clip_crop: Sequence[int] = (336, 336), sam_size: int = 1024
) -> dict:
    """Geometry ``preprocess`` uses for an (H, W) image: clip_resized, clip_crop_offset, sam_resized."""
    try:
        return _C.geometry(tuple(size), clip_size, tuple(clip_crop), sam_size)
    except (ValueError, TypeError) as exc:
        raise _convert(exc, image_arg=False) from None


def resize_rgb(
    rgb: np.ndarray,
    size: Sequence[int],
    resample: str,
    *,
    num_threads: int | None = None,
    pillow_order: str = "auto",
) -> np.ndarray:
    """Pillow-equivalent ``Image.resize`` of uint8 [H, W, 3] to size (h, w); resample 'bilinear'|'bicubic'."""
    if not isinstance(rgb, np.ndarray):
        raise ImageError(f"rgb must be a numpy.ndarray of uint8 [H, W, 3], got {type(rgb).__name__}")
    try:
        return _C.resize_rgb(rgb, tuple(size), resample, _threads(num_threads), _pillow13(pillow_order))
    except (ValueError, TypeError) as exc:
        raise _convert(exc, image_arg=True) from None


def postprocess_masks(
    low_res: np.ndarray,
    input_size: Sequence[int],
    original_size: Sequence[int],
    with_stats: bool = False,
    *,
    image_size: int = 1024,
    num_threads: int | None = None,
):
    """float32 [N, h, w] -> bool [N, H, W]; with_stats -> (masks, union [H, W], bboxes int64 [N, 4], areas int64 [N])."""
    if not isinstance(low_res, np.ndarray):
        raise RequestError(
            f"low_res must be a numpy.ndarray of float32 [N, h, w], got {type(low_res).__name__}"
        )
    try:
        return _C.postprocess_masks(
            low_res, input_size, original_size, image_size, bool(with_stats), _threads(num_threads)
        )
    except (ValueError, TypeError) as exc:
        raise _convert(exc, image_arg=False) from None


def cuda_compiled() -> bool:
    """True when legion_rt._C was built with the CUDA kernels."""
    return bool(_C.cuda_compiled())


def cuda_available() -> bool:
    """True when the native core has CUDA kernels and a CUDA device is usable. Never raises."""
    try:
        return bool(_C.cuda_compiled()) and _C.cuda_device_count() > 0
    except Exception:
        return False


def cuda_memory_pools_supported(device: int = 0) -> bool:
    """Whether ``device`` supports stream-ordered allocation. The kernels' scratch buffers use cudaMallocAsync
    there and cudaMalloc / cudaFree elsewhere (some virtualized GPUs have no memory pools). Never raises."""
    try:
        return bool(_C.cuda_memory_pools_supported(int(device)))
    except Exception:
        return False


def preprocess_cuda(
    rgb_ptr: int,
    size: Sequence[int],
    clip_out_ptr: int,
    sam_out_ptr: int,
    stream: int = 0,
    *,
    clip_size: int = 336,
    clip_crop: Sequence[int] = (336, 336),
    clip_mean: Sequence[float] = CLIP_MEAN,
    clip_std: Sequence[float] = CLIP_STD,
    sam_size: int = 1024,
    sam_mean: Sequence[float] = SAM_MEAN,
    sam_std: Sequence[float] = SAM_STD,
    pillow_order: str = "auto",
) -> tuple[int, int]:
    """Device version of :func:`preprocess`: rgb uint8 [H, W, 3] at ``rgb_ptr`` (size = (H, W)) ->
    clip f32 [3, ch, cw] at ``clip_out_ptr``, sam f32 [3, S, S] at ``sam_out_ptr``; returns (h', w').
    Raises RuntimeError when built without CUDA or when a CUDA call fails."""
    try:
        h, w = _C.preprocess_cuda(
            int(rgb_ptr),
            tuple(size),
            int(clip_out_ptr),
            int(sam_out_ptr),
            int(stream),
            clip_size,
            tuple(clip_crop),
            tuple(clip_mean),
            tuple(clip_std),
            sam_size,
            tuple(sam_mean),
            tuple(sam_std),
            _pillow13(pillow_order),
        )
    except (ValueError, TypeError) as exc:
        raise _convert(exc, image_arg=False) from None
    return int(h), int(w)


def postprocess_masks_cuda(
    low_res_ptr: int,
    low_res_shape: Sequence[int],
    input_size: Sequence[int],
    original_size: Sequence[int],
    masks_out_ptr: int,
    union_out_ptr: int = 0,
    bboxes_out_ptr: int = 0,
    areas_out_ptr: int = 0,
    stream: int = 0,
    *,
    image_size: int = 1024,
) -> None:
    """Device version of :func:`postprocess_masks`: f32 [N, h, w] at ``low_res_ptr`` -> bool(uint8)
    [N, H, W] at ``masks_out_ptr``; optional union uint8 [H, W], bboxes int64 [N, 4], areas int64 [N]
    (give all three or none). Raises RuntimeError when built without CUDA or when a CUDA call fails."""
    try:
        _C.postprocess_masks_cuda(
            int(low_res_ptr),
            tuple(low_res_shape),
            tuple(input_size),
            tuple(original_size),
            int(masks_out_ptr),
            int(union_out_ptr),
            int(bboxes_out_ptr),
            int(areas_out_ptr),
            int(stream),
            image_size,
        )
    except (ValueError, TypeError) as exc:
        raise _convert(exc, image_arg=False) from None


def pack_masks_cuda(masks_ptr: int, n: int, per_mask: int, packed_out_ptr: int, stream: int = 0) -> None:
    """Device bit-packing of ``n`` masks of ``per_mask`` uint8 values at ``masks_ptr`` into uint8
    [n, ceil(per_mask / 8)] at ``packed_out_ptr`` (LSB first: legion_rt.device_path.pack_masks is the same on the
    host). Raises RuntimeError when built without CUDA or when a CUDA call fails."""
    try:
        _C.pack_masks_cuda(int(masks_ptr), int(n), int(per_mask), int(packed_out_ptr), int(stream))
    except (ValueError, TypeError) as exc:
        raise _convert(exc, image_arg=False) from None
