"""Verdict only, batched: the vision graph and the detector head over batches of pictures; no LLM, no SAM.

``Engine.classify(images, batch_size=8, color_order="rgb")`` returns one ``Classification`` per picture;
``iter_classify`` yields them batch by batch (pictures are decoded one batch at a time, so memory does not grow
with the number of pictures). The exported vision graph has a batch axis (pixel_values f32 [B, 3, 336, 336] ->
cls_logits [B, 2]); the backends' ``vision`` runs it on a stacked batch. The verdict rule is the one of
``Request.vision`` (legion_rt/request.py): softmax of the logits in float64, index 0 = fake, argmax with ties to
fake, so the verdicts equal ``analyze``'s. Batched and batch-1 logits differ only by float rounding of the
batched matrix products (measured in tests/test_classify.py and benchmarks/classify.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import RequestError
from .image import check_color_order, load_image

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine


@dataclass(frozen=True)
class Classification:
    """The detector's answer for one picture. ``verdict``: "fake" | "real"; ``fake_probability``:
    ``softmax(cls_logits)[0]``; ``label``: argmax, 1 = real, 0 = fake; ``image``: the input's path when it had one."""

    verdict: str
    fake_probability: float
    label: int
    cls_logits: list[float]
    image: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"image": self.image} if self.image is not None else {}
        d.update(
            verdict=self.verdict,
            fake_probability=self.fake_probability,
            label=self.label,
            cls_logits=list(self.cls_logits),
        )
        return d


def verdict_of(logits: Any, image: str | None = None) -> Classification:
    """Detector logits [2] -> Classification, with exactly the rule of ``Request.vision``."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)  # [2]: index 0 = fake, 1 = real
    e = np.exp(z - z.max())
    p = e / e.sum()
    label = int(np.argmax(z))  # a tie goes to index 0 (fake), as torch.argmax in the reference
    return Classification(
        verdict="real" if label == 1 else "fake",
        fake_probability=float(p[0]),
        label=label,
        cls_logits=[float(v) for v in z],
        image=image,
    )


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise RequestError(f"batch_size={batch_size!r}: must be an integer >= 1")
    return int(batch_size)


def clip_pixels(engine: Engine, image: Any, color_order: str = "rgb") -> np.ndarray:
    """One picture -> its CLIP pixels f32 [1, 3, 336, 336] (the same preprocessing as a request)."""
    rgb = load_image(image, max_pixels=engine.max_pixels, color_order=color_order)
    clip_px, _sam, _ = engine._preprocess(rgb)
    return clip_px


def vision_batch(engine: Engine, pixels: list[np.ndarray]) -> np.ndarray:
    """CLIP pixels [1,3,336,336] each -> detector logits [N, 2], in batches as given."""
    backend = engine._backend
    if len(pixels) == 1 or not getattr(backend, "batched_vision", backend.name == "onnxruntime"):
        outs = [backend.vision(px)[1] for px in pixels]  # TensorRT engines are built for batch 1
        return np.concatenate([np.asarray(o, dtype=np.float32).reshape(1, -1) for o in outs])
    _emb, logits = backend.vision(np.ascontiguousarray(np.concatenate(pixels, axis=0)))
    return np.asarray(logits, dtype=np.float32).reshape(len(pixels), -1)


def iter_classify(
    engine: Engine,
    images: Iterable[Any],
    *,
    batch_size: int = 8,
    color_order: str = "rgb",
    on_error=None,
) -> Iterator[Classification]:
    """Yield one Classification per picture, in order, running the vision graph ``batch_size`` pictures at a
    time. A picture that cannot be decoded raises ``ImageError``; with ``on_error(image, error)`` it is reported
    there instead and skipped (the CLI's ``--keep-going``)."""
    batch_size = _check_batch_size(batch_size)
    color_order = check_color_order(color_order)
    if isinstance(images, (str, bytes, bytearray, os.PathLike)):
        images = [images]  # one picture, not a sequence of characters
    if not engine.has_detector:
        raise RequestError("classify: these artifacts have no detector (export with --detector)")
    from .errors import ImageError

    names: list[str | None] = []
    pixels: list[np.ndarray] = []

    def flush() -> Iterator[Classification]:
        logits = vision_batch(engine, pixels)
        for name, z in zip(names, logits, strict=True):
            yield verdict_of(z, name)
        names.clear()
        pixels.clear()

    for image in images:
        try:
            px = clip_pixels(engine, image, color_order)
        except ImageError as e:
            if on_error is None:
                raise
            on_error(image, e)
            continue
        name = os.fspath(image) if isinstance(image, (str, os.PathLike)) else None
        names.append(name if isinstance(name, str) else None)
        pixels.append(px)
        if len(pixels) == batch_size:
            yield from flush()
    if pixels:
        yield from flush()


def classify(
    engine: Engine, images: Iterable[Any], *, batch_size: int = 8, color_order: str = "rgb"
) -> list[Classification]:
    """``Engine.classify``: one Classification per picture (see ``iter_classify``)."""
    return list(iter_classify(engine, images, batch_size=batch_size, color_order=color_order))
