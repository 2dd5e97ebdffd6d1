"""Frame sources for ``Engine.watch``: an iterable of frames, a video file, a directory of frames, a camera or a
URL, each opened as an iterator of ``Frame(index, time_s, rgb)`` (RGB uint8 [H, W, 3], index counting every frame
of the source from 0).

Video files, cameras and URLs are decoded with OpenCV (``cv2.VideoCapture``) or PyAV, the optional ``video``
extra (``pip install 'legion_rt[video]'``); without either, opening one raises a one-line ``LegionError`` saying
what to install. Frame directories are decoded with ``load_image`` (cv2.imread-exact, no extra needed).

Stream time (``time_s``): for a video file the frame's presentation time (PyAV) or ``index / fps`` of the
container's frame rate (OpenCV); for a camera or URL the seconds since the first frame arrived (wall clock); for
an iterable, ``(time_s, frame)`` pairs give their own times, bare frames have none (None) unless it is live; a
frame directory has none.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ImageError, LegionError, RequestError
from .image import check_color_order, load_image
from .inputs import is_picture_name

INSTALL_HINT = "pip install 'legion_rt[video]' (PyAV and OpenCV)"
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
DECODERS = ("auto", "opencv", "pyav")


@dataclass
class Frame:
    index: int
    time_s: float | None
    rgb: np.ndarray


class FrameSource:
    """An opened source: iterate for ``Frame``s; ``live`` (frames arrive on their own clock: a camera or URL);
    ``fps`` (nominal frame rate or None); ``name``; ``close()``."""

    live = False
    fps: float | None = None
    name = "<frames>"

    def __iter__(self) -> Iterator[Frame]:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        pass


class IterableSource(FrameSource):
    """Frames from an iterable: ``ndarray`` (RGB, or BGR with ``color_order="bgr"``), anything ``load_image``
    takes, or ``(time_s, frame)`` pairs."""

    def __init__(
        self, frames: Iterable[Any], *, color_order: str = "rgb", live: bool = False, max_pixels=None
    ):
        self._it = iter(frames)
        self.color_order = check_color_order(color_order)
        self.live = bool(live)
        self.max_pixels = max_pixels
        self.name = f"<{type(frames).__name__}>"

    def __iter__(self) -> Iterator[Frame]:
        t0 = None
        for i, item in enumerate(self._it):
            t = None
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], (int, float)):
                t, item = float(item[0]), item[1]
            elif self.live:
                now = time.monotonic()
                t0 = now if t0 is None else t0
                t = now - t0
            kw = {"max_pixels": self.max_pixels} if self.max_pixels else {}
            yield Frame(i, t, load_image(item, color_order=self.color_order, **kw))

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


class DirectorySource(FrameSource):
    """The picture files of a directory (not recursive), in name order; no stream time."""

    def __init__(self, path: str | os.PathLike, *, max_pixels=None):
        self.path = Path(path)
        self.name = os.fspath(path)
        self.max_pixels = max_pixels
        self.files = sorted(
            p
            for p in self.path.iterdir()
            if p.is_file() and not p.name.startswith(".") and is_picture_name(p.name)
        )
        if not self.files:
            raise ImageError(f"{self.name}: no picture files in this directory")

    def __iter__(self) -> Iterator[Frame]:
        kw = {"max_pixels": self.max_pixels} if self.max_pixels else {}
        for i, p in enumerate(self.files):
            yield Frame(i, None, load_image(p, **kw))


class OpenCVSource(FrameSource):
    def __init__(self, target: str | int, *, live: bool, name: str):
        import cv2

        self._cv2 = cv2
        self.name = name
        self.live = live
        self.cap = cv2.VideoCapture(target)
        if not self.cap.isOpened():
            self.cap.release()
            raise LegionError(f"{name}: cannot open this video source (OpenCV)")
        fps = float(self.cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if fps > 0 and np.isfinite(fps) else None

    def __iter__(self) -> Iterator[Frame]:
        i = 0
        t0 = None
        while True:
            ok, bgr = self.cap.read()
            if not ok or bgr is None:
                return
            if self.live:
                now = time.monotonic()
                t0 = now if t0 is None else t0
                t = now - t0
            else:
                t = i / self.fps if self.fps else None
            yield Frame(i, t, load_image(bgr, color_order="bgr", max_pixels=2**62))
            i += 1

    def close(self) -> None:
        self.cap.release()


class PyAVSource(FrameSource):
    def __init__(self, target: str, *, live: bool, name: str):
        import av

        self.name = name
        self.live = live
        try:
            self.container = av.open(target)
        except Exception as e:  # av.error.* (FileNotFoundError, InvalidDataError, ...)
            raise LegionError(
                f"{name}: cannot open this video source (PyAV: {str(e).splitlines()[0]})"
            ) from None
        if not self.container.streams.video:
            self.container.close()
            raise LegionError(f"{name}: no video stream")
        rate = self.container.streams.video[0].average_rate
        self.fps = float(rate) if rate else None

    def __iter__(self) -> Iterator[Frame]:
        t0 = None
        for i, fr in enumerate(self.container.decode(video=0)):
            if self.live:
                now = time.monotonic()
                t0 = now if t0 is None else t0
                t = now - t0
            else:
                t = float(fr.time) if fr.time is not None else (i / self.fps if self.fps else None)
            yield Frame(i, t, np.ascontiguousarray(fr.to_ndarray(format="rgb24")))

    def close(self) -> None:
        self.container.close()


def _camera_index(source: Any) -> int | None:
    if isinstance(source, bool):
        return None
    if isinstance(source, int):
        return source
    if isinstance(source, str) and source.isdigit():
        return int(source)
    return None


def open_source(
    source: Any,
    *,
    color_order: str = "rgb",
    live: bool | None = None,
    decoder: str = "auto",
    max_pixels: int | None = None,
) -> FrameSource:
    """Open ``source``: an iterable of frames, a directory of pictures, a video file, a camera (``/dev/videoN``
    or an index) or a URL (``rtsp://``, ``http://``, ...). ``live``: None = cameras and URLs are live, the rest
    not. ``decoder``: "auto" (OpenCV, else PyAV), "opencv" or "pyav"."""
    if decoder not in DECODERS:
        raise RequestError(f"decoder={decoder!r}: must be one of {', '.join(DECODERS)}")
    if isinstance(source, FrameSource):
        return source
    cam = _camera_index(source)
    if cam is None and not isinstance(source, (str, os.PathLike)):
        if isinstance(source, (bytes, bytearray)) or not isinstance(source, Iterable):
            raise RequestError(
                f"watch: unsupported source {type(source).__name__} (give a path, URL, camera or iterable of frames)"
            )
        return IterableSource(source, color_order=color_order, live=bool(live), max_pixels=max_pixels)
    check_color_order(color_order)
    if cam is not None:
        target: Any = cam
        name, is_live = f"camera {cam}", True
    else:
        name = os.fspath(source)
        if _URL.match(name):
            target, is_live = name, True
        elif name.startswith("/dev/video"):
            target, is_live = name, True
        else:
            p = Path(name)
            if p.is_dir():
                return DirectorySource(p, max_pixels=max_pixels)
            if not p.exists():
                raise LegionError(f"{name}: no such video file or directory")
            target, is_live = name, False
    is_live = is_live if live is None else bool(live)
    return _open_video(target, name=name, live=is_live, decoder=decoder)


def _open_video(target, *, name: str, live: bool, decoder: str) -> FrameSource:
    tried = []
    if decoder in ("auto", "opencv"):
        try:
            import cv2  # noqa: F401
        except ImportError:
            tried.append("OpenCV")
        else:
            return OpenCVSource(target, live=live, name=name)
    if decoder in ("auto", "pyav"):
        try:
            import av  # noqa: F401
        except ImportError:
            tried.append("PyAV")
        else:
            if isinstance(target, int):
                raise LegionError(
                    f"{name}: PyAV opens cameras by device path (e.g. /dev/video0), not by index"
                )
            return PyAVSource(target, live=live, name=name)
    raise LegionError(f"{name}: decoding video needs {' or '.join(tried)}: {INSTALL_HINT}")
