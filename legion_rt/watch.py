"""``Engine.watch`` and ``legion-rt watch``: analyze a stream of frames (video file, camera, URL, frame directory,
iterable of arrays), yielding one ``FrameResult(index, time_s, status, result, same_as)`` per frame considered.

* Sampling: ``every=N`` considers frames 0, N, 2N, ...; ``fps=F`` considers the first frame at or after each
  1/F seconds of stream time (sources without stream time refuse ``fps``). Frames left out by sampling are not
  reported.
* ``min_change=T`` in [0, 1]: a considered frame whose change against the **last analyzed** frame is below T is
  not analyzed: status ``"unchanged"``, ``same_as`` = the index of the frame whose result stands (drift adds up
  against that frame, so a slow pan is analyzed again once it has moved far enough).
* Live sources (cameras, URLs, or ``live=True``): a reader thread takes frames as they come and keeps only the
  newest considered one; when analysis is slower than the source, the frames it replaced are reported as
  ``"dropped"`` (before the frame that replaced them) and memory stays flat. Other sources are read at the pace
  of the analysis and never drop frames.
* An analyzed frame's ``result`` is exactly ``engine.analyze(frame, **options)`` of the decoded frame.

Change measure (``frame_change``): both frames are reduced to 32 x 32 RGB thumbnails (block means); the change is
the larger of a structure term, ``1 - max(0, r)`` with ``r`` the correlation of the mean-centred thumbnails
(0 for the same picture, about 1 for unrelated ones), and a brightness term, ``2 x |mean(a) - mean(b)| / 255``
capped at 1 (a fade, which leaves the structure alone). Identical frames change by 0; compression noise on a
static scene by about 0.001; unrelated pictures by close to 1. It costs a block mean of a subsampled frame (about 1 ms, no model
work), so unchanged frames are nearly free. Measured on static stretches, slow pans and cuts:
benchmarks/watch.py and benchmarks/README.md.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import RequestError
from .image import check_color_order
from .result import Result
from .sources import Frame, FrameSource, open_source

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine

STATUSES = ("analyzed", "unchanged", "dropped")
THUMB = 32


@dataclass(frozen=True)
class FrameResult:
    """One considered frame. ``status``: "analyzed" (``result`` is its Result), "unchanged" (``same_as``: the
    analyzed frame whose result stands; ``result`` is that Result) or "dropped" (a live source moved on before
    it could be analyzed; ``result`` None). ``change``: the measured change against the last analyzed frame
    (None when not measured)."""

    index: int
    time_s: float | None
    status: str
    result: Result | None = None
    same_as: int | None = None
    change: float | None = None
    # The decoded frame (RGB uint8 [H, W, 3]) with ``with_frames=True``, for drawing; None otherwise and for
    # dropped frames.
    frame: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """``{"frame", "time_s", "status", "same_as", "change"}``, plus the Result JSON when analyzed."""
        doc: dict[str, Any] = {}
        if self.status == "analyzed" and self.result is not None:
            doc.update(self.result.to_dict())
        doc.update(
            frame=self.index,
            time_s=self.time_s,
            status=self.status,
            same_as=self.same_as,
            change=None if self.change is None else round(float(self.change), 6),
        )
        return doc


# ------------------------------------------------------------------------------------------ change measure
def thumbnail(rgb: np.ndarray, size: int = THUMB) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> float32 [size, size, 3] block means (blocks as even as the size allows; a side
    shorter than ``size`` repeats pixels). Large frames are first subsampled to at most about 8 x ``size``
    samples per side (every k-th pixel), so the cost stays near 1 ms whatever the resolution."""
    limit = 8 * size
    sy, sx = max(1, rgb.shape[0] // limit), max(1, rgb.shape[1] // limit)
    if sy > 1 or sx > 1:
        rgb = rgb[::sy, ::sx]
    h, w = rgb.shape[:2]
    rows = (np.arange(size) * h) // size
    cols = (np.arange(size) * w) // size
    if h >= size:
        a = np.add.reduceat(rgb, rows, axis=0, dtype=np.uint32)
        a = a / np.diff(np.append(rows, h))[:, None, None]
    else:
        a = rgb[rows].astype(np.float64)
    if w >= size:
        b = np.add.reduceat(a, cols, axis=1)
        b = b / np.diff(np.append(cols, w))[None, :, None]
    else:
        b = a[:, cols]
    return b.astype(np.float32)


def thumb_change(ta: np.ndarray, tb: np.ndarray) -> float:
    """The change between two thumbnails, in [0, 1] (see the module docstring)."""
    a = ta.astype(np.float64)
    b = tb.astype(np.float64)
    bright = min(1.0, 2.0 * abs(float(a.mean()) - float(b.mean())) / 255.0)
    ca = a - a.mean(axis=(0, 1))
    cb = b - b.mean(axis=(0, 1))
    na, nb = float(np.sqrt((ca * ca).sum())), float(np.sqrt((cb * cb).sum()))
    flat = 1e-3 * ta.size  # below this norm a thumbnail has no structure to compare (a flat frame)
    if na < flat and nb < flat:
        structure = 0.0
    elif na < flat or nb < flat:
        structure = 1.0
    else:
        structure = 1.0 - max(0.0, float((ca * cb).sum()) / (na * nb))
    return float(min(1.0, max(structure, bright)))


def frame_change(a: np.ndarray, b: np.ndarray) -> float:
    """The change between two RGB frames, in [0, 1]: 0 for identical frames, close to 1 for unrelated ones."""
    return thumb_change(thumbnail(a), thumbnail(b))


# ---------------------------------------------------------------------------------------------- sampling
class _Sampler:
    def __init__(self, every: int | None, fps: float | None):
        self.every, self.period = every, (1.0 / fps if fps else None)
        self.next_t: float | None = None

    def __call__(self, frame: Frame) -> bool:
        if self.every is not None:
            return frame.index % self.every == 0
        if self.period is None:
            return True
        t = frame.time_s
        if t is None:
            raise RequestError(
                "fps: this source has no stream time (a frame directory or bare frames); use every="
            )
        if self.next_t is None or t >= self.next_t - 1e-9:
            base = t if self.next_t is None else self.next_t
            self.next_t = base + self.period
            if self.next_t <= t:  # a gap in the stream: restart the grid at this frame
                self.next_t = t + self.period
            return True
        return False


class _Latest:
    """Live reading: a thread pulls frames, keeps the newest considered one; replaced ones become drops."""

    def __init__(self, source: FrameSource, sampler: _Sampler, limit: int | None):
        self.source, self.sampler, self.limit = source, sampler, limit
        self.cond = threading.Condition()
        self.item: Frame | None = None
        self.dropped: deque[tuple[int, float | None]] = deque()
        self.done = False
        self.stop = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._read, name="legion-watch-reader", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for frame in self.source:
                if self.stop or (self.limit is not None and frame.index >= self.limit):
                    break
                if not self.sampler(frame):
                    continue
                with self.cond:
                    if self.item is not None:
                        self.dropped.append((self.item.index, self.item.time_s))
                    self.item = frame
                    self.cond.notify()
        except BaseException as e:  # handed to the consumer
            self.error = e
        finally:
            with self.cond:
                self.done = True
                self.cond.notify()

    def take(self) -> tuple[list[tuple[int, float | None]], Frame | None]:
        with self.cond:
            while self.item is None and not self.done and not self.dropped:
                self.cond.wait()
            dropped = list(self.dropped)
            self.dropped.clear()
            item, self.item = self.item, None
            if item is None and self.done and self.error is not None:
                raise self.error
            return dropped, item

    def close(self) -> bool:
        self.stop = True
        self.thread.join(timeout=5.0)
        return not self.thread.is_alive()


# ------------------------------------------------------------------------------------------------- watch
def _check(every, fps, min_change, limit_frames) -> None:
    if every is not None and fps is not None:
        raise RequestError("every= and fps= exclude each other: give one")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise RequestError(f"every={every!r}: must be an integer >= 1")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
        raise RequestError(f"fps={fps!r}: must be a number > 0")
    if min_change is not None and (
        isinstance(min_change, bool) or not isinstance(min_change, (int, float)) or not 0 <= min_change <= 1
    ):
        raise RequestError(f"min_change={min_change!r}: must be a number in [0, 1]")
    if limit_frames is not None and (
        isinstance(limit_frames, bool) or not isinstance(limit_frames, int) or limit_frames < 1
    ):
        raise RequestError(f"limit_frames={limit_frames!r}: must be an integer >= 1")


def watch(
    engine: Engine,
    source: Any,
    *,
    every: int | None = None,
    fps: float | None = None,
    min_change: float | None = None,
    color_order: str = "rgb",
    live: bool | None = None,
    limit_frames: int | None = None,
    decoder: str = "auto",
    with_frames: bool = False,
    **options: Any,
) -> Iterator[FrameResult]:
    """Yield one ``FrameResult`` per considered frame of ``source`` (see the module docstring). ``color_order``:
    of array frames from an iterable; ``live``: None = cameras and URLs are live; ``limit_frames``: read at most
    the first K frames of the source; ``decoder``: "auto" | "opencv" | "pyav"; ``with_frames``: attach each
    considered frame's pixels to its FrameResult (``frame``; holding on to them holds the memory); ``options``: those of
    ``Engine.analyze`` (max_new_tokens, skip_if_real, ...). Bad arguments raise here, at the call; closing the
    iterator closes the source."""
    _check(every, fps, min_change, limit_frames)
    check_color_order(color_order)
    if "image" in options:
        raise RequestError("watch: give the frames as source, not image=")
    src = open_source(
        source, color_order=color_order, live=live, decoder=decoder, max_pixels=engine.max_pixels
    )
    return _watch(engine, src, _Sampler(every, fps), min_change, limit_frames, options, with_frames)


def _watch(
    engine, src: FrameSource, sampler, min_change, limit, options, with_frames
) -> Iterator[FrameResult]:
    last: tuple[int, np.ndarray, Result] | None = (
        None  # (index, thumbnail, result) of the last analyzed frame
    )

    def consider(frame: Frame) -> FrameResult:
        nonlocal last
        change = None
        thumb = thumbnail(frame.rgb) if min_change is not None else None
        pixels = frame.rgb if with_frames else None
        if last is not None and thumb is not None:
            change = thumb_change(last[1], thumb)
            if change < float(min_change):
                return FrameResult(frame.index, frame.time_s, "unchanged", last[2], last[0], change, pixels)
        result = engine.analyze(frame.rgb, **options)
        if thumb is not None:
            last = (frame.index, thumb, result)
        return FrameResult(frame.index, frame.time_s, "analyzed", result, None, change, pixels)

    reader = None
    try:
        if not src.live:
            for frame in src:
                if limit is not None and frame.index >= limit:
                    break
                if sampler(frame):
                    yield consider(frame)
            return
        reader = _Latest(src, sampler, limit)
        while True:
            dropped, frame = reader.take()
            for index, t in dropped:
                yield FrameResult(index, t, "dropped")
            if frame is not None:
                yield consider(frame)
                frame = None
            elif reader.done and not reader.dropped and reader.item is None:
                return
    finally:
        if reader is None or reader.close():
            src.close()


# ---------------------------------------------------------------------------------------------------- CLI
def main(args, engine_from_args) -> int:
    """``legion-rt watch SOURCE --artifacts ART [--every N | --fps F] [--min-change T] [--jsonl FILE|-]
    [--limit-frames K]``: one JSON line per considered frame, written and flushed as it happens (Ctrl-C leaves
    every line written so far intact); a status line per frame on stderr unless --quiet."""
    from .outputs import JsonlWriter, check_jsonl_path, info

    check_jsonl_path("--jsonl", args.jsonl)
    video_out = getattr(args, "video_out", None)
    if video_out:
        from .errors import UsageError

        if os.path.splitext(video_out)[1].lower() not in _FOURCC:
            raise UsageError(f"--video-out {video_out}: give an .avi (MJPEG) or .mp4 (MPEG-4) file name")
        if os.path.isdir(video_out):
            raise UsageError(f"--video-out {video_out}: is a directory; give a file name")
    opts = {"max_new_tokens": args.max_new_tokens, "skip_if_real": args.skip_if_real}
    source: Any = args.source
    src = open_source(source)  # a missing file or extra fails before the model loads
    try:
        engine = engine_from_args(args)
    except BaseException:
        src.close()
        raise
    frames = watch(
        engine,
        src,
        every=args.every,
        fps=args.fps,
        min_change=args.min_change,
        limit_frames=args.limit_frames,
        with_frames=bool(video_out),
        **opts,
    )
    counts = dict.fromkeys(STATUSES, 0)
    jsonl = JsonlWriter(args.jsonl) if args.jsonl else None
    video = None
    try:
        for fr in frames:
            counts[fr.status] += 1
            if jsonl is not None:
                jsonl.write(fr.to_dict())
            if video_out and fr.frame is not None:
                if video is None:
                    rate = args.fps or ((frames_fps(source) or 10.0) / (args.every or 1))
                    video = AnnotatedVideo(video_out, fr.frame.shape[1], fr.frame.shape[0], rate)
                video.write(fr)
            if not args.quiet:
                t = "" if fr.time_s is None else f" t={fr.time_s:.3f}s"
                if fr.status == "analyzed":
                    r = fr.result
                    v = (
                        "no detector"
                        if r.verdict is None
                        else f"{r.verdict} (P(fake) = {r.fake_probability:.4f})"
                    )
                    info(f"frame {fr.index}{t}: {v}; {len(r.artifacts)} masks")
                elif fr.status == "unchanged":
                    info(
                        f"frame {fr.index}{t}: unchanged (change {fr.change:.4f}), same as frame {fr.same_as}"
                    )
                else:
                    info(f"frame {fr.index}{t}: dropped")
    finally:
        frames.close()
        if jsonl is not None:
            jsonl.close()
        if video is not None:
            video.close()
            if not args.quiet:
                info(f"annotated video: {video_out} ({video.frames} frames)")
        if not args.quiet:
            info("frames: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


# ------------------------------------------------------------------------------------- annotated video
_FOURCC = {".avi": "MJPG", ".mp4": "mp4v"}


def frames_fps(source: Any) -> float | None:
    """The nominal frame rate of a video file (OpenCV), or None."""
    try:
        import cv2
    except ImportError:
        return None
    if not isinstance(source, str) or not os.path.isfile(source):
        return None
    cap = cv2.VideoCapture(source)
    try:
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    finally:
        cap.release()
    return fps if fps > 0 else None


class AnnotatedVideo:
    """``legion-rt watch --video-out``: every considered frame with its standing result drawn on it (masks tinted,
    boxes, verdict; legion_rt/overlay.py) and its status; OpenCV's VideoWriter (MJPEG .avi or MPEG-4 .mp4) at the
    sampled frame rate. Frames of another size than the first are scaled to it."""

    def __init__(self, path: str, width: int, height: int, fps: float):
        from .errors import LegionError

        try:
            import cv2
        except ImportError:
            raise LegionError(
                "--video-out needs OpenCV: pip install 'legion_rt[video]' (PyAV and OpenCV)"
            ) from None
        self.cv2 = cv2
        self.size = (int(width), int(height))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        ext = os.path.splitext(path)[1].lower()
        self.writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*_FOURCC[ext]), float(fps), self.size)
        if not self.writer.isOpened():
            raise LegionError(f"{path}: cannot write this video (OpenCV)")
        self.frames = 0

    def write(self, fr: FrameResult) -> None:
        from .overlay import render_overlay

        rgb = fr.frame
        r = fr.result
        if r is not None and r.mask.shape == rgb.shape[:2]:
            rgb = render_overlay(rgb, r)
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        if (bgr.shape[1], bgr.shape[0]) != self.size:
            bgr = self.cv2.resize(bgr, self.size, interpolation=self.cv2.INTER_AREA)
        tag = f"frame {fr.index}: {fr.status}" + (f" (as {fr.same_as})" if fr.same_as is not None else "")
        self.cv2.putText(
            bgr, tag, (4, self.size[1] - 6), self.cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1
        )
        self.writer.write(bgr)
        self.frames += 1

    def close(self) -> None:
        self.writer.release()
