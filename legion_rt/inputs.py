"""Picture arguments of the CLI: files, directories (recursively, picture extensions) and globs, expanded to a
sorted list of paths; a cheap check of each (exists, not empty, header readable, size within the limit) without
decoding pixels; output names derived from the paths that never collide.

Nothing here decodes a picture: ``analyze`` and ``classify`` decode one at a time, so memory does not grow with
the number of pictures.
"""

from __future__ import annotations

import glob
import os
import warnings
from pathlib import Path

from .errors import ImageError, UsageError
from .image import DEFAULT_MAX_PIXELS

# What a directory or glob expands to (case-insensitive). Files named explicitly are taken whatever their name.
PICTURE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".png",
        ".bmp",
        ".webp",
        ".tif",
        ".tiff",
        ".gif",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
    }
)
_GLOB_CHARS = set("*?[")


def is_picture_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in PICTURE_EXTENSIONS


def expand(args: list[str]) -> list[str]:
    """Files as given; directories walked recursively (sorted, picture extensions, hidden entries skipped);
    globs (``*``, ``?``, ``[``, ``**`` recursive) matched, picture files only. Each path once, in argument order.
    An argument that matches nothing raises UsageError."""
    out: list[str] = []
    seen: set[str] = set()

    def add(p: str) -> None:
        key = os.path.normpath(p)
        if key not in seen:
            seen.add(key)
            out.append(p)

    for arg in args:
        if os.path.isdir(arg):
            found = list(_walk(arg))
            if not found:
                raise UsageError(
                    f"{arg}: no pictures in this directory ({', '.join(sorted(PICTURE_EXTENSIONS))})"
                )
            for p in found:
                add(p)
        elif not os.path.exists(arg) and _GLOB_CHARS & set(arg):
            found = sorted(
                p for p in glob.glob(arg, recursive=True) if os.path.isfile(p) and is_picture_name(p)
            )
            if not found:
                raise UsageError(f"{arg}: the pattern matches no picture")
            for p in found:
                add(p)
        else:
            add(arg)  # a file (or a missing one: the check names it)
    return out


def _walk(root: str):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and is_picture_name(f):
                yield os.path.join(dirpath, f)


def check_header(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Cheap check before any decoding: the file exists, is not empty, Pillow recognises its header, and its
    pixel count is within ``max_pixels``. Returns (W, H). Raises ImageError naming the file."""
    from PIL import Image

    p = Path(path)
    if p.is_dir():
        raise ImageError(f"{path}: is a directory, not an image file")
    if not p.is_file():
        raise ImageError(f"{path}: no such image file")
    try:
        if p.stat().st_size == 0:
            raise ImageError(f"{path}: empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as im:  # reads the header only
                w, h = im.size
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"{path}: too many pixels, over the limit of {max_pixels}") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{path}: cannot decode image (not a picture format Pillow can read)") from None
    except OSError as e:
        if e.errno is not None:  # the file system said no (permission, I/O error)
            raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None
        # Pillow's own OSErrors ("Truncated File Read", "broken data stream") are bad contents, not bad I/O
        raise ImageError(f"{path}: cannot decode image ({str(e).splitlines()[0] or 'truncated'})") from None
    except Exception as e:
        raise ImageError(
            f"{path}: cannot decode image ({str(e).splitlines()[0] or type(e).__name__})"
        ) from None
    if w <= 0 or h <= 0:
        raise ImageError(f"{path}: zero-sized image ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(f"{path}: image has {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
    return int(w), int(h)


def output_key(path: str) -> str:
    """A file-name-safe name for the outputs of one picture, derived from its whole path as given, so that
    ``a/x.jpg``, ``b/x.jpg`` and ``a/x.png`` never share output files: the extension is kept, ``%`` and the
    path separators are percent-encoded (an injective mapping: distinct paths give distinct keys), a leading
    ``./`` is dropped. ``a/x.jpg`` -> ``a%2Fx.jpg``."""
    p = os.path.normpath(path)
    p = p.replace("%", "%25").replace("/", "%2F")
    if os.sep != "/":  # pragma: no cover - Windows
        p = p.replace(os.sep, "%5C")
    return p
