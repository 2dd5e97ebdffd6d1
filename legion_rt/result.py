"""What a request produces: ``Result`` (the whole answer), ``Artifact`` (one [SEG] region) and the stream events
``TokenEvent`` / ``MaskEvent`` / ``DoneEvent``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import rle

SCHEMA_VERSION = 1  # of the Result JSON (legion_rt/schemas/result.schema.json)


def result_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the Result JSON, shipped in the package."""
    import json
    from importlib import resources

    return json.loads(resources.files(__package__).joinpath("schemas/result.schema.json").read_text("utf-8"))


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
        """JSON-ready, with the mask as COCO RLE (``mask_rle``, see ``legion_rt.rle``)."""
        return {
            "index": self.index,
            "phrase": self.phrase,
            "bbox": [int(v) for v in self.bbox],
            "area": int(self.area),
            "token_index": self.token_index,
            "mask_rle": rle.encode(self.mask),
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
        """The Result JSON (schema 1, ``legion_rt/schemas/result.schema.json``): what ``--json``, each
        ``--jsonl`` line and the HTTP service write. Masks are COCO RLE: ``mask_rle`` (the union) and each
        artifact's ``mask_rle``. ``image`` is present only when the input had a name. ``cls_logits`` and
        ``mask_area`` are extra keys kept from before the schema."""
        doc: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "model": {
                "name": self.model.get("name"),
                "manifest_sha256": self.model.get("manifest_sha256"),
            },
        }
        if self.image is not None:
            doc["image"] = self.image
        return doc | {
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
            "image_size": [int(v) for v in self.image_size],
            "mask_rle": rle.encode(self.mask),
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
