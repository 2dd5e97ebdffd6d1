"""``legion-rt eval``: SynthScars-format evaluation of artifact localization (docs/REFERENCE.md "Evaluation").

Dataset layout (SynthScars)::

    DIR/{train,test}/images/*                 the pictures
    DIR/{train,test}/annoations/*.json        (sic; "annotations" is accepted too) each a list of
        {"<id>": {"caption", "img_file_name", "refs": [{"sentence", "explanation", "bbox": null,
                  "segmentation": [[x1, y1, x2, y2, ...], ...]}]}}

Per picture: the union of the predicted masks (``Result.mask``) against the union of the ground-truth polygons,
rasterized as LEGION's ``eval/utils.py`` does: coordinates truncated to int32, ``cv2.fillPoly`` with value 1.
This needs OpenCV (opencv-python-headless, in the ``test`` extra): ``eval`` is a development tool, the runtime
itself never imports it.

Metrics per picture: foreground IoU = |P & G| / (|P | G| + 1e-6), background IoU likewise on the complements,
mIoU = their mean; F1 = 2 TP / (2 TP + FP + FN) over pixels, 1.0 when both masks are empty. Averages are over
pictures, overall and per content type (the ``content_type`` / ``type`` / ``category`` field of an entry when
present, else the annotation file's name when there are several files, else "all").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LegionError, RequestError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass
class Sample:
    image: Path
    polygons: list[list[float]]  # flat [x1, y1, x2, y2, ...] lists
    content_type: str


def _cv2():
    try:
        import cv2
    except ImportError:
        raise LegionError(
            "eval rasterizes the ground-truth polygons with OpenCV as LEGION does: pip install opencv-python-headless"
        ) from None
    return cv2


def load_dataset(root: str | Path, split: str = "test") -> list[Sample]:
    """The pictures of ``root/split`` that have an annotation entry, in file-name order."""
    root = Path(root)
    base = root / split
    images_dir = base / "images"
    ann_dir = next((base / n for n in ("annoations", "annotations") if (base / n).is_dir()), None)
    if not images_dir.is_dir():
        raise LegionError(f"{images_dir}: missing (expected the SynthScars layout {split}/images)")
    if ann_dir is None:
        raise LegionError(f"{base}: no annoations/ (or annotations/) directory")
    files = sorted(ann_dir.glob("*.json"))
    if not files:
        raise LegionError(f"{ann_dir}: no annotation JSON files")
    by_name: dict[str, Sample] = {}
    for f in files:
        try:
            entries = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LegionError(f"{f}: not valid JSON ({e})") from None
        if not isinstance(entries, list):
            raise LegionError(f"{f}: expected a JSON list of {{id: entry}} objects")
        for item in entries:
            if not isinstance(item, dict):
                raise LegionError(f"{f}: an element is not an object")
            for _key, value in item.items():
                if not isinstance(value, dict) or "img_file_name" not in value:
                    raise LegionError(f"{f}: entry without img_file_name")
                name = Path(str(value["img_file_name"])).name
                ctype = value.get("content_type") or value.get("type") or value.get("category")
                ctype = str(ctype) if ctype else (f.stem if len(files) > 1 else "all")
                polys = []
                for ref in value.get("refs", []) or []:
                    for seg in ref.get("segmentation", []) or []:
                        if len(seg) >= 6 and len(seg) % 2 == 0:
                            polys.append([float(v) for v in seg])
                sample = by_name.setdefault(name, Sample(images_dir / name, [], ctype))
                sample.polygons.extend(polys)
    samples = [s for _, s in sorted(by_name.items()) if s.image.is_file()]
    if not samples:
        raise LegionError(f"{images_dir}: no picture matches an annotation entry")
    return samples


def gt_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """bool [H, W]: the polygons filled like LEGION's generate_mask (int32 truncation, cv2.fillPoly)."""
    cv2 = _cv2()
    mask = np.zeros((height, width), dtype=np.uint8)
    for seg in polygons:
        pts = np.asarray(seg, dtype=np.float32).reshape(-1, 2).astype(np.int32)
        cv2.fillPoly(mask, [pts], 1)
    return mask.astype(bool)


def metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """mIoU (mean of foreground and background IoU, +1e-6 in the denominators) and pixel F1 of two bool masks."""
    if pred.shape != gt.shape:
        raise RequestError(f"mask shapes differ: {pred.shape} vs {gt.shape}")
    tp = int(np.logical_and(pred, gt).sum())
    fp = int(np.logical_and(pred, ~gt).sum())
    fn = int(np.logical_and(~pred, gt).sum())
    tn = pred.size - tp - fp - fn
    iou_fg = tp / (tp + fp + fn + 1e-6)
    iou_bg = tn / (tn + fp + fn + 1e-6)
    f1 = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
    return {"miou": (iou_fg + iou_bg) / 2, "iou_fg": iou_fg, "iou_bg": iou_bg, "f1": f1}


def evaluate(engine, samples: list[Sample], *, max_new_tokens: int = 512, log=None) -> dict[str, Any]:
    """Run every sample; returns {"overall": {...}, "per_type": {type: {...}}, "images": [...]}."""
    rows = []
    for i, s in enumerate(samples):
        result = engine.analyze(s.image, max_new_tokens=max_new_tokens)
        h, w = result.mask.shape
        m = metrics(result.mask, gt_mask(s.polygons, h, w))
        rows.append(
            {"image": str(s.image), "content_type": s.content_type, **m, "masks": len(result.artifacts)}
        )
        if log:
            log(f"[{i + 1}/{len(samples)}] {s.image.name}: mIoU {m['miou']:.4f} F1 {m['f1']:.4f}")

    def mean(rs, k):
        return float(np.mean([r[k] for r in rs])) if rs else math.nan

    types = sorted({r["content_type"] for r in rows})
    per_type = {
        t: {"images": len(rs), "miou": mean(rs, "miou"), "f1": mean(rs, "f1")}
        for t in types
        for rs in [[r for r in rows if r["content_type"] == t]]
    }
    overall = {"images": len(rows), "miou": mean(rows, "miou"), "f1": mean(rows, "f1")}
    return {"overall": overall, "per_type": per_type, "images": rows}


def main(args) -> int:
    """``legion-rt eval --artifacts ART --dataset DIR [--split test] [--limit N] [--json FILE]``."""
    import sys

    from .cli import engine_from_args
    from .overlay import atomic_write_json

    samples = load_dataset(args.dataset, args.split)
    if args.limit:
        samples = samples[: args.limit]
    engine = engine_from_args(args)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    report = evaluate(engine, samples, max_new_tokens=args.max_new_tokens, log=log)
    print(f"{'content type':<16} {'images':>6} {'mIoU %':>8} {'F1 %':>8}")
    for t, r in report["per_type"].items():
        print(f"{t:<16} {r['images']:>6} {100 * r['miou']:>8.2f} {100 * r['f1']:>8.2f}")
    o = report["overall"]
    print(f"{'overall':<16} {o['images']:>6} {100 * o['miou']:>8.2f} {100 * o['f1']:>8.2f}")
    if args.json:
        atomic_write_json(args.json, report)
    return 0
