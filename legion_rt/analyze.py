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
    """Decode every picture up front (the demo's single picture; ``analyze`` decodes one at a time)."""
    from .image import DEFAULT_MAX_PIXELS, load_image

    return [load_image(p, max_pixels=max_pixels or DEFAULT_MAX_PIXELS) for p in images]


def result_doc(name: str, result) -> dict:
    """The Result JSON of one picture with its path as ``"image"`` (set after ``to_dict()``, which may write
    its own ``"image"``: the result of a decoded array has none)."""
    doc = result.to_dict()
    doc["image"] = printable(name)
    return doc


def run_analyze(
    engine,
    images: list[str],
    rgbs: list | None,
    *,
    json_path,
    overlay_path,
    masks_dir,
    opts,
    quiet: bool,
    show_text=True,
    jsonl=None,
    keep_going: bool = False,
    errors: dict[str, str] | None = None,
) -> list:
    """Run ``images`` (paths) one after the other. ``rgbs``: their decoded pictures, or None to decode each one
    just before it runs (memory does not grow with the number of pictures). ``jsonl``: a ``JsonlWriter`` that
    gets one Result JSON line per picture as it finishes; ``keep_going``: a picture that cannot be decoded or
    used gets an error line (``{"image", "error"}``) and the run goes on; ``errors`` collects those
    (name -> message). Output pictures of several inputs are named by their whole path (``inputs.output_key``),
    so ``a/x.jpg`` and ``b/x.jpg`` never overwrite each other. Returns the number of pictures that failed."""
    from .image import load_image
    from .inputs import output_key
    from .overlay import atomic_write_json, write_masks, write_overlay
    from .progress import make_progress

    docs: list[dict] = []  # the --json documents (small); results are not kept, their masks are large
    failed = 0
    multi = len(images) > 1
    errors = {} if errors is None else errors
    progress = make_progress(len(images), quiet=quiet or not multi, what="pictures")
    try:
        for i, path in enumerate(images):
            try:
                rgb = rgbs[i] if rgbs is not None else load_image(path, max_pixels=engine.max_pixels)
                if multi and show_text:
                    progress.print(f"== {path}")
                result = stream_one(engine, path, rgb, opts, quiet=quiet, show_text=show_text)
            except ImageError as e:
                if not keep_going:
                    raise
                errors[path] = str(e)
                failed += 1
                if jsonl is not None:
                    jsonl.write({"image": printable(path), "error": str(e)})
                progress.advance(f"{path}: error: {e}", ok=False)
                continue
            rgbs_kept, rgb = rgb, None
            if json_path:
                docs.append(result_doc(path, result))
            if jsonl is not None:
                jsonl.write(result_doc(path, result))
            key = output_key(path) if multi else Path(path).stem
            if overlay_path:
                target = numbered(Path(overlay_path), key, multi)
                out = write_or_fail(target, write_overlay, target, rgbs_kept, result)
                if not quiet:
                    progress.print(f"overlay: {out}")
            del rgbs_kept
            if masks_dir:
                outs = write_or_fail(masks_dir, write_masks, masks_dir, result, stem=key)
                if not quiet:
                    progress.print(f"masks: {len(outs)} PNG files in {masks_dir}")
            if not multi:
                if not quiet:
                    info(summary(path, result))
            else:
                progress.advance(summary(path, result), ok=True)
    finally:
        progress.close()
    if json_path:
        write_or_fail(json_path, atomic_write_json, json_path, docs[0] if not multi and docs else docs)
        if not quiet:
            info(f"json: {json_path}")
    return failed
