"""``legion-rt analyze`` (and the demo's analyze step): run pictures through an Engine, stream the answer text
to the terminal, print a summary line per picture, write the JSON / overlay / mask files asked for."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .errors import ImageError
from .outputs import info, numbered, printable, write_or_fail


def stream_one(engine, image, rgb, opts: dict[str, Any], *, quiet: bool, show_text: bool):
    """Run one picture, printing the answer text as it is generated. Returns the Result."""
    from .result import DoneEvent, MaskEvent, TokenEvent

    result = None
    mid_line = False  # the streamed text has no newline yet
    printed = False
    try:
        events = engine.stream(rgb, **opts)  # checks the picture's geometry before any work
    except ImageError as e:  # it names the array it was given: name the file instead
        raise ImageError(f"{image}: {str(e).split(': ', 1)[-1]}") from None
    for ev in events:
        if isinstance(ev, TokenEvent):
            text = (
                ev.text if printed else ev.text.lstrip()
            )  # the answer's first piece carries a leading space
            if show_text and text:
                printed = True
                sys.stdout.write(text)
                sys.stdout.flush()
                mid_line = True
        elif isinstance(ev, MaskEvent):
            if not quiet:
                if mid_line:
                    sys.stdout.write("\n")
                    sys.stdout.flush()
                    mid_line = False
                a = ev.artifact
                info(f"[mask {a.index + 1}] {a.phrase or '(no phrase)'}: bbox {a.bbox}, {a.area} px")
        elif isinstance(ev, DoneEvent):
            result = ev.result
    if mid_line:
        sys.stdout.write("\n")
    return result


def summary(name: str, result) -> str:
    v = (
        "no detector"
        if result.verdict is None
        else f"{result.verdict} (P(fake) = {result.fake_probability:.4f})"
    )
    t = result.timings
    if result.skipped:
        return f"{name}: {v}; explanation skipped (detect-first gate: P(real) at or over --skip-if-real)"
    return (
        f"{name}: {v}; {len(result.token_ids)} tokens, {len(result.artifacts)} masks; "
        f"total {t['total']:.2f} s (first token {t.get('time_to_first_token', float('nan')):.3f} s)"
    )


def decode_all(images: list[str], max_pixels: int | None = None) -> list:
    """Decode every picture up front: a bad one fails the command before a model is loaded or a file written."""
    from .image import DEFAULT_MAX_PIXELS, load_image

    return [load_image(p, max_pixels=max_pixels or DEFAULT_MAX_PIXELS) for p in images]


def run_analyze(
    engine,
    images: list[str],
    rgbs: list,
    *,
    json_path,
    overlay_path,
    masks_dir,
    opts,
    quiet: bool,
    show_text=True,
) -> list:
    from .overlay import atomic_write_json, write_masks, write_overlay

    results = []
    multi = len(images) > 1
    for path, rgb in zip(images, rgbs, strict=True):
        if multi and show_text:
            info(f"== {path}")
        result = stream_one(engine, path, rgb, opts, quiet=quiet, show_text=show_text)
        results.append(result)
        if not quiet:
            info(summary(path, result))
        stem = Path(path).stem
        if overlay_path:
            target = numbered(Path(overlay_path), stem, multi)
            out = write_or_fail(target, write_overlay, target, rgb, result)
            if not quiet:
                info(f"overlay: {out}")
        if masks_dir:
            outs = write_or_fail(masks_dir, write_masks, masks_dir, result, stem=stem)
            if not quiet:
                info(f"masks: {len(outs)} PNG files in {masks_dir}")
    if json_path:
        docs = [{"image": printable(p), **r.to_dict()} for p, r in zip(images, results, strict=True)]
        write_or_fail(json_path, atomic_write_json, json_path, docs[0] if not multi else docs)
        if not quiet:
            info(f"json: {json_path}")
    return results
