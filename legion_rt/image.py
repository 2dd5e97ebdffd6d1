"""Decode an input picture to RGB uint8 [H, W, 3] exactly like the reference's ``cv2.imread`` + BGR->RGB.

The reference (LEGION's ``infer.py``) reads with OpenCV's ``imread(path)`` (IMREAD_COLOR). What that does,
measured against opencv-python-headless 5.0 on generated pictures (tests/test_image.py):

* EXIF orientation (tag 0x0112) is applied, for JPEG and PNG alike.
* Always 3 channels: gray (``L``, ``1``, ``LA``) is replicated, alpha is dropped **without compositing**
  (RGBA, LA, palette with tRNS transparency: only the colour is kept).
* 16-bit samples become 8-bit by ``value >> 8`` (PNG RGB/RGBA/gray/gray+alpha, grayscale TIFF).
  Known difference: for 16-bit *colour* TIFF OpenCV rounds (``round(v / 257)``) while Pillow only exposes the
  high byte, so those pictures may differ from OpenCV by 1 step on some pixels.
* CMYK JPEG: libjpeg hands OpenCV the stored (Adobe-inverted) samples and OpenCV maps them with
  ``x' = k - ((255 - x) * k >> 8)``. Pillow un-inverts on read (raw mode ``CMYK;I``) and its own CMYK->RGB is
  a different formula (up to 2 steps off), so we redo OpenCV's integer formula on the stored samples.

Pillow is the only decoder (OpenCV is never imported by the runtime). The pixel count is checked from the
header, before any pixel is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ImageError

# Default ceiling on W*H (checked before decoding). 64 Mpx is larger than any camera picture in common use and
# keeps one decoded picture + the SAM/CLIP inputs well under 1 GB.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024

_EXIF_ORIENTATION = 0x0112


def describe(src: Any) -> str:
    """A short human name of an input, for error messages."""
    if isinstance(src, (str, os.PathLike)):
        return str(src) or "<empty path>"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    if isinstance(src, np.ndarray):
        return f"<ndarray shape={tuple(src.shape)} dtype={src.dtype}>"
    try:
        from PIL import Image

        if isinstance(src, Image.Image):
            return f"<PIL.Image mode={src.mode} size={src.size[0]}x{src.size[1]}>"
    except ImportError:  # pragma: no cover - Pillow is a runtime dependency
        pass
    return f"<{type(src).__name__}>"


COLOR_ORDERS = ("rgb", "bgr")


def check_color_order(color_order: Any) -> str:
    """``"rgb"`` or ``"bgr"`` (any case); anything else raises RequestError."""
    from .errors import RequestError

    if not isinstance(color_order, str) or color_order.lower() not in COLOR_ORDERS:
        raise RequestError(f"color_order={color_order!r}: must be 'rgb' or 'bgr'")
    return color_order.lower()


def load_image(src: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS, color_order: str = "rgb") -> np.ndarray:
    """Return the picture as a C-contiguous RGB uint8 array [H, W, 3].

    ``src``: a path (str / PathLike), encoded file bytes, a ``PIL.Image.Image`` (EXIF orientation applied as for a
    file), or an ndarray: uint8 [H, W, 3] (RGB, or BGR with ``color_order="bgr"``, e.g. a frame from OpenCV) or
    uint8 [H, W] gray (replicated). ``color_order`` applies to arrays only: files, bytes and PIL images carry
    their own colour model. Raises ``ImageError`` naming the input when it cannot be read, is truncated, empty,
    zero-sized, of an unsupported pixel format, or has more than ``max_pixels`` pixels; ``RequestError`` for a
    ``color_order`` other than "rgb" / "bgr".
    """
    order = check_color_order(color_order)
    name = describe(src)
    if isinstance(src, np.ndarray):
        rgb = _from_array(src, name, max_pixels)
        return np.ascontiguousarray(rgb[:, :, ::-1]) if order == "bgr" else rgb
    from PIL import Image

    if isinstance(src, Image.Image):
        _check_size(src.size, name, max_pixels)
        return _from_pil(src, name)
    if isinstance(src, (str, os.PathLike)):
        if not os.fspath(src):  # Path("") would be the current directory
            raise ImageError(f"{name}: empty image path")
        path = Path(src)
        if path.is_dir():
            raise ImageError(f"{name}: is a directory, not an image file")
        if not path.is_file():
            raise ImageError(f"{name}: no such image file")
        if path.stat().st_size == 0:
            raise ImageError(f"{name}: empty file")
        fp: Any = path
    elif isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ImageError(f"{name}: empty image bytes")
        fp = io.BytesIO(bytes(src))
    else:
        raise ImageError(
            f"{name}: unsupported image input type (give a path, bytes, PIL.Image or uint8 ndarray)"
        )
    try:
        with warnings.catch_warnings():
            # Our own limit is checked below; Pillow's bomb warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                _check_size(im.size, name, max_pixels)  # header only: nothing decoded yet
                im.load()
                return _from_pil(im, name)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: too many pixels, over the limit of {max_pixels} ({e})") from None
    except Image.UnidentifiedImageError:  # its message repeats the name (or a BytesIO repr): say it plainly
        raise ImageError(f"{name}: cannot decode image (not a picture format Pillow can read)") from None
    except OSError as e:
        if e.errno is None:  # Pillow's decode errors ("image file is truncated") are OSErrors without errno
            raise ImageError(
                f"{name}: cannot decode image ({str(e).splitlines()[0] or type(e).__name__})"
            ) from None
        raise ImageError(f"{name}: cannot read ({e.strerror})") from None  # permission denied, I/O error
    except Exception as e:  # Pillow raises OSError/SyntaxError/ValueError/... for bad files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageError(f"{name}: cannot decode image ({msg})") from None


def _check_size(size: tuple[int, int], name: str, max_pixels: int) -> None:
    w, h = int(size[0]), int(size[1])
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: zero-sized image ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(f"{name}: image has {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")


def _from_array(a: np.ndarray, name: str, max_pixels: int) -> np.ndarray:
    if a.dtype != np.uint8:
        raise ImageError(f"{name}: arrays must be uint8 RGB [H, W, 3]")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ImageError(f"{name}: arrays must be uint8 RGB [H, W, 3] (or gray [H, W])")
    _check_size((a.shape[1], a.shape[0]), name, max_pixels)
    return np.ascontiguousarray(a)


def _from_pil(im, name: str) -> np.ndarray:
    """PIL image (any mode) -> RGB uint8 [H, W, 3] with OpenCV's conversions, then EXIF orientation."""
    orientation = 1
    try:
        orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a broken EXIF block: OpenCV ignores it too
        orientation = 1
    mode = im.mode
    if mode == "RGB":
        rgb = np.asarray(im)
    elif mode in ("RGBA", "RGBX", "RGBa"):
        rgb = np.asarray(im)[:, :, :3]  # alpha dropped, not composited (as OpenCV)
    elif mode in ("L", "LA", "La"):
        g = np.asarray(im)
        g = g if g.ndim == 2 else g[:, :, 0]
        rgb = np.repeat(g[:, :, None], 3, axis=2)
    elif mode == "1":
        g = np.asarray(im.convert("L"))
        rgb = np.repeat(g[:, :, None], 3, axis=2)
    elif mode in ("P", "PA"):
        rgb = np.asarray(im.convert("RGBA"))[:, :, :3] if mode == "PA" else np.asarray(im.convert("RGB"))
    elif mode.startswith("I;16") or mode == "I":
        # 16-bit gray (mode "I" is how older Pillow versions open 16-bit gray PNGs): keep the high byte.
        v = np.asarray(im).astype(np.int64)
        g = (np.clip(v, 0, 65535) >> 8).astype(np.uint8)
        rgb = np.repeat(g[:, :, None], 3, axis=2)
    elif mode == "CMYK":
        rgb = _cmyk_like_opencv(im)
    elif mode in ("YCbCr", "LAB", "HSV"):
        rgb = np.asarray(im.convert("RGB"))
    else:
        raise ImageError(f"{name}: unsupported pixel format {mode!r}")
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageError(f"{name}: zero-sized image")
    rgb = _apply_orientation(rgb, orientation)
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def _cmyk_like_opencv(im) -> np.ndarray:
    """OpenCV's CMYK->RGB on the samples libjpeg returns (the stored ones)."""
    v = np.asarray(im).astype(np.int32)  # [H, W, 4], what Pillow made of the stored samples
    # Pillow's JPEG reader always un-inverts CMYK (raw mode "CMYK;I", Adobe convention): undo that to get the
    # stored samples libjpeg gives OpenCV. Other formats (TIFF) are taken as stored.
    stored = 255 - v if im.format == "JPEG" else v
    k = stored[:, :, 3:4]
    out = k - (((255 - stored[:, :, :3]) * k) >> 8)  # OpenCV icvCvt_CMYK2BGR_8u_C4C3R, per channel
    return out.astype(np.uint8)


def _apply_orientation(a: np.ndarray, orientation: int) -> np.ndarray:
    """EXIF orientation 1..8 on an [H, W, C] array (same result as PIL.ImageOps.exif_transpose)."""
    if orientation == 2:
        return a[:, ::-1]
    if orientation == 3:
        return a[::-1, ::-1]
    if orientation == 4:
        return a[::-1, :]
    if orientation == 5:
        return a.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(a, k=-1)
    if orientation == 7:
        return a.transpose(1, 0, 2)[::-1, ::-1]
    if orientation == 8:
        return np.rot90(a, k=1)
    return a
