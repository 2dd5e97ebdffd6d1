"""Masks as COCO run-length encoding (RLE), the form the Result JSON carries them in.

``encode(mask)`` gives ``{"size": [H, W], "counts": "<compressed string>"}`` exactly as
``pycocotools.mask.encode`` writes it (column-major runs, LEB128-like compressed counts), with ``counts`` as a
``str`` so it is JSON-ready; ``pycocotools.mask.decode`` (after ``counts.encode()``) or ``decode`` here gives the
mask back bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _mask_utils():
    try:
        from pycocotools import mask as mask_utils
    except ImportError:  # pragma: no cover - a runtime dependency of the package
        from .errors import LegionError

        raise LegionError("the Result JSON needs pycocotools: pip install pycocotools") from None
    return mask_utils


def encode(mask: Any) -> dict[str, Any]:
    """bool/uint8 [H, W] -> ``{"size": [H, W], "counts": str}`` (COCO compressed RLE)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"a mask must be 2-D [H, W], got shape {m.shape}")
    rle = _mask_utils().encode(np.asfortranarray(m != 0, dtype=np.uint8))
    counts = rle["counts"]
    return {
        "size": [int(rle["size"][0]), int(rle["size"][1])],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else str(counts),
    }


def decode(rle: dict[str, Any]) -> np.ndarray:
    """``{"size": [H, W], "counts": str | bytes}`` -> bool [H, W]."""
    counts = rle["counts"]
    obj = {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}
    if isinstance(counts, str):
        obj["counts"] = counts.encode("ascii")
    return _mask_utils().decode(obj).astype(bool)
