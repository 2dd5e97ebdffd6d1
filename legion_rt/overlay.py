"""Pictures a person looks at: the overlay (masks tinted, boxes drawn) and one PNG per mask of a ``Result``.
Files are written atomically (legion_rt/outputs.py)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from .outputs import atomic_write_bytes, atomic_write_json  # noqa: F401  (old import path)

# Distinct, colour-blind-friendly tints (Okabe-Ito), one per artifact in order.
PALETTE = [
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
]


def png_bytes(rgb_or_gray: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb_or_gray)).save(buf, format="PNG")
    return buf.getvalue()


def render_overlay(rgb: np.ndarray, result, *, alpha: float = 0.45, labels: bool = True) -> np.ndarray:
    """RGB uint8 [H, W, 3] with each artifact's mask tinted in its own colour, its bbox outlined and numbered,
    and the verdict written in the corner. Returns RGB uint8 [H, W, 3]."""
    from PIL import Image, ImageDraw

    out = rgb.astype(np.float32).copy()
    for i, art in enumerate(result.artifacts):
        color = np.asarray(PALETTE[i % len(PALETTE)], dtype=np.float32)
        m = art.mask
        out[m] = (1 - alpha) * out[m] + alpha * color
    img = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    width = max(1, round(min(img.size) / 200))
    for i, art in enumerate(result.artifacts):
        if art.area == 0:
            continue
        x0, y0, x1, y1 = art.bbox
        color = PALETTE[i % len(PALETTE)]
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=color, width=width)
        if labels:
            tag = f"{i + 1}" + (f": {art.phrase[:40]}" if art.phrase else "")
            draw.text((x0 + 2 * width, y0 + 2 * width), tag, fill=color)
    if labels and result.verdict is not None:
        tag = f"{result.verdict} (P(fake) = {result.fake_probability:.3f})"
        draw.rectangle([0, 0, 8 + 6 * len(tag), 14], fill=(0, 0, 0))
        draw.text((4, 2), tag, fill=(255, 255, 255))
    return np.asarray(img)


def write_overlay(path: str | os.PathLike, rgb: np.ndarray, result) -> Path:
    return atomic_write_bytes(path, png_bytes(render_overlay(rgb, result)))


def write_masks(directory: str | os.PathLike, result, *, stem: str = "mask") -> list[Path]:
    """``{stem}_union.png`` and ``{stem}_{i}.png`` per artifact (0/255 gray, like the reference's mask.png)."""
    directory = Path(directory)
    paths = [
        atomic_write_bytes(directory / f"{stem}_union.png", png_bytes(result.mask.astype(np.uint8) * 255))
    ]
    for i, art in enumerate(result.artifacts):
        paths.append(
            atomic_write_bytes(directory / f"{stem}_{i}.png", png_bytes(art.mask.astype(np.uint8) * 255))
        )
    return paths
