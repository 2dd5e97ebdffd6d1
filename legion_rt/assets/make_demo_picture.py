"""Regenerates demo.jpg, the picture `legion-rt demo` analyzes: a procedural landscape (sky, sun, layered hills,
a lake with reflections, grass texture), so the package ships no third-party photo. Deterministic (seed 7)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter


def make(width: int = 640, height: int = 448, seed: int = 7) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    t = y / height
    # sky: vertical gradient, warm near the horizon
    sky = np.stack([70 + 150 * t, 120 + 100 * t, 200 + 30 * t], axis=2)
    img = sky.copy()
    # sun with a soft halo
    sx, sy = 0.72 * width, 0.22 * height
    d = np.hypot(x - sx, y - sy)
    halo = np.exp(-((d / 60.0) ** 2))[..., None]
    img = img * (1 - 0.6 * halo) + np.array([255, 236, 180]) * 0.6 * halo
    img[d < 22] = [255, 248, 220]

    def ridge(base, amp, freqs):
        h = np.full(width, base * height, np.float32)
        for f, a in freqs:
            h += amp * a * np.sin(np.arange(width) * f + rng.uniform(0, 6.28))
        return h

    layers = [
        (ridge(0.48, 30, [(0.011, 1.0), (0.031, 0.4), (0.07, 0.15)]), (95, 110, 140)),
        (ridge(0.56, 26, [(0.017, 1.0), (0.05, 0.3), (0.11, 0.1)]), (60, 95, 70)),
        (ridge(0.64, 18, [(0.023, 1.0), (0.07, 0.35), (0.15, 0.1)]), (45, 80, 45)),
    ]
    for h, color in layers:
        below = y > h[None, :]
        shade = 1.0 - 0.25 * np.clip((y - h[None, :]) / (0.3 * height), 0, 1)
        img[below] = np.array(color)[None, :] * shade[below][:, None]
    # lake: reflect the picture above the shoreline, darkened, with ripples
    shore = int(0.72 * height)
    ripple = (3 * np.sin(y[shore:] / 3.0 + x[shore:] / 40.0)).astype(int)
    src_rows = np.clip(2 * shore - y[shore:].astype(int) + ripple, 0, shore - 1)
    lake = img[src_rows, x[shore:].astype(int)] * 0.7 + np.array([10, 30, 60]) * 0.3
    lake_mask = (x[shore:] > 0.15 * width) & (x[shore:] < 0.85 * width + 40 * np.sin(y[shore:] / 20))
    img[shore:][lake_mask] = lake[lake_mask]
    # grass texture on the near bank
    grass = (y > shore) & ~np.pad(lake_mask, ((shore, 0), (0, 0)))
    img[grass] = img[grass] * (0.85 + 0.3 * rng.random(grass.sum()))[:, None]
    img += rng.normal(0, 3.0, img.shape)  # sensor-like noise
    pic = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return pic.filter(ImageFilter.GaussianBlur(0.6))


if __name__ == "__main__":
    out = Path(__file__).with_name("demo.jpg")
    make().save(out, quality=88, optimize=True)
    print(out, out.stat().st_size, "bytes")
