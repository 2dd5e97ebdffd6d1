"""What a request produces: ``Result`` (the whole answer), ``Artifact`` (one [SEG] region) and the stream events
``TokenEvent`` / ``MaskEvent`` / ``DoneEvent``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Artifact:
    """One [SEG] of the answer. ``mask``: bool [H, W] at the input picture's size; ``bbox``: (x0, y0, x1, y1),
    end-exclusive pixel coordinates, (0, 0, 0, 0) for an empty mask; ``area``: mask pixels; ``index``: order among
    the [SEG] tokens; ``token_index``: position of its [SEG] in ``Result.token_ids``."""

    phrase: str | None
    mask: np.ndarray
    bbox: tuple[int, int, int, int]
    area: int
    index: int = 0
    token_index: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "phrase": self.phrase,
            "bbox": list(self.bbox),
            "area": self.area,
            "token_index": self.token_index,
        }


@dataclass
class Result:
    """The full answer for one picture (docs/CONTRACT.md "Result"). ``label``: detector argmax, 1 = real, 0 = fake.
    ``skipped``: the detect-first gate stopped after the verdict."""

    verdict: str | None
    fake_probability: float | None
    explanation: str | None
    text: str | None
    token_ids: list[int]
    artifacts: list[Artifact]
    mask: np.ndarray
    timings: dict[str, float]
    label: int | None = None
    cls_logits: list[float] | None = None
    skipped: bool = False
    phrases: list[str] = field(default_factory=list)
    image_size: tuple[int, int] = (0, 0)  # (H, W)
    # Which model answered: {"name": manifest model name, "manifest_sha256": sha256 of manifest.json}
    model: dict[str, str] = field(default_factory=dict)
    image: str | None = None  # the input's name (a path as given) when it had one

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (masks are not included: write them as PNGs)."""
        return {
            "verdict": self.verdict,
            "fake_probability": self.fake_probability,
            "label": self.label,
            "cls_logits": self.cls_logits,
            "skipped": self.skipped,
            "explanation": self.explanation,
            "text": self.text,
            "phrases": self.phrases,
            "token_ids": self.token_ids,
            "artifacts": [a.to_dict() for a in self.artifacts],
            "mask_area": int(self.mask.sum()),
            "image_size": list(self.image_size),
            "timings": {
                k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.timings.items()
            },
        }


@dataclass(frozen=True)
class TokenEvent:
    """A generated token and the text it adds to the answer (may be "" while a character is incomplete)."""

    token_id: int
    text: str


@dataclass(frozen=True)
class MaskEvent:
    artifact: Artifact


@dataclass(frozen=True)
class DoneEvent:
    result: Result
