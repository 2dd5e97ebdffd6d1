"""The change gate of ``watch`` (``min_change``) on static stretches, slow pans and cuts, and what it costs.

    python benchmarks/watch.py [--markdown]

No model is needed: the gate is ``legion_rt.watch.frame_change`` (32 x 32 thumbnail correlation + brightness,
see legion_rt/watch.py). The stream is made from the bundled photos (tests/fixtures/photos, legion_rt/assets),
at 320x240, each frame JPEG-compressed at quality 85 after adding camera-like noise (+-3 levels), as a camera
stream would deliver:

- static: the same view for 60 frames;
- pan N px: a 320x240 window sliding N pixels per frame over a 2x enlarged photo (N = 1, 2, 4), 60 frames;
- fade: the view darkening by 1 % per frame, 30 frames;
- cut: a hard switch to another photo (every photo pair).

For each kind: the change between consecutive frames (median, max), and for thresholds T the share of frames
``watch`` would analyze (the change is measured against the last analyzed frame, so drift adds up). Cuts: the
smallest change of any cut (a cut is caught when it is over T). Cost: ``frame_change`` on 1920x1080 frames.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

THRESHOLDS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


def _jpeg(rgb: np.ndarray, rng) -> np.ndarray:
    import io

    from PIL import Image

    noisy = np.clip(rgb.astype(np.int16) + rng.integers(-3, 4, rgb.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="JPEG", quality=85)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _photos():
    from PIL import Image

    from legion_rt.image import load_image

    files = sorted((REPO / "tests" / "fixtures" / "photos").glob("*.jpg")) + [
        REPO / "legion_rt/assets/demo.jpg"
    ]
    out = {}
    for f in files:
        im = Image.fromarray(load_image(f)).resize((640, 480), Image.BICUBIC)
        out[f.stem] = np.asarray(im)
    return out


def streams(rng):
    photos = _photos()
    views = {k: np.ascontiguousarray(v[120:360, 160:480]) for k, v in photos.items()}
    out = {}
    out["static"] = [[_jpeg(v, rng) for _ in range(60)] for v in views.values()]
    for n in (1, 2, 4):
        out[f"pan {n} px/frame"] = [
            [_jpeg(np.ascontiguousarray(p[100:340, x : x + 320]), rng) for x in range(0, 60 * n, n)]
            for p in photos.values()
        ]
    out["fade 1 %/frame"] = [
        [_jpeg((v * (1 - 0.01 * i)).astype(np.uint8), rng) for i in range(30)] for v in views.values()
    ]
    cuts = [(_jpeg(views[a], rng), _jpeg(views[b], rng)) for a, b in itertools.permutations(views, 2)]
    return out, cuts


def gate(frames, t):
    """How many frames watch(min_change=t) analyzes."""
    from legion_rt.watch import thumb_change, thumbnail

    last, n = None, 0
    for f in frames:
        th = thumbnail(f)
        if last is None or thumb_change(last, th) >= t:
            last, n = th, n + 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--markdown", action="store_true", help="(the output is a Markdown table either way)")
    ap.parse_args()
    from legion_rt.watch import frame_change

    rng = np.random.default_rng(0)
    kinds, cuts = streams(rng)
    head = "| stream | consecutive change median / max | " + " | ".join(f"T={t}" for t in THRESHOLDS) + " |"
    print(head)
    print("|---|---|" + "---:|" * len(THRESHOLDS))
    for name, clips in kinds.items():
        ch = [frame_change(a, b) for c in clips for a, b in itertools.pairwise(c)]
        total = sum(len(c) for c in clips)
        shares = [sum(gate(c, t) for c in clips) / total for t in THRESHOLDS]
        cells = " | ".join(f"{100 * s:.0f} %" for s in shares)
        print(f"| {name} | {statistics.median(ch):.4f} / {max(ch):.4f} | {cells} |")
    cut_changes = [frame_change(a, b) for a, b in cuts]
    caught = " | ".join(f"{sum(c >= t for c in cut_changes)}/{len(cut_changes)}" for t in THRESHOLDS)
    print(
        f"| cut (caught) | min {min(cut_changes):.3f}, median {statistics.median(cut_changes):.3f} | {caught} |"
    )
    big = np.ascontiguousarray(np.resize(kinds["static"][0][0], (1080, 1920, 3)))
    big2 = big.copy()
    frame_change(big, big2)
    t = time.perf_counter()
    for _ in range(20):
        frame_change(big, big2)
    ms = (time.perf_counter() - t) / 20 * 1e3
    print(
        f"\nframe_change on two 1920x1080 frames: {ms:.1f} ms (both thumbnails; watch computes one per frame)"
    )


if __name__ == "__main__":
    main()
