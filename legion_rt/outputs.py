"""Output files of the CLI: atomic writes (temporary file + rename, so a failure never leaves a partial file),
output paths checked before any work, OS errors as one line naming the file, file names for several pictures."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from .errors import LegionError, UsageError


def info(msg: str) -> None:
    """A progress or status line for a person: stderr, so stdout keeps the answer text."""
    print(msg, file=sys.stderr, flush=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def printable(path) -> str:
    """A file name as valid Unicode: a non-UTF-8 name (surrogate escapes in ``str``) shows its bytes as ``\\xff``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def numbered(path: Path, stem: str, multi: bool) -> Path:
    return path.with_name(f"{path.stem}-{stem}{path.suffix}") if multi else path


def check_output_paths(*, json_path=None, overlay_path=None, masks_dir=None) -> None:
    """Refuse output paths that cannot be written before any work is done (a missing parent directory is
    created when writing, as before). Raises UsageError naming the option and path."""
    for opt, path in (("--json", json_path), ("--overlay", overlay_path)):
        if not path:
            continue
        p = Path(path)
        if p.is_dir():
            raise UsageError(f"{opt} {path}: is a directory; give a file name")
        parent = next((a for a in p.parents if a.exists()), None)
        if parent is not None and not parent.is_dir():
            raise UsageError(f"{opt} {path}: {parent} is not a directory")
    if overlay_path and Path(overlay_path).suffix.lower() != ".png":
        raise UsageError(f"--overlay {overlay_path}: the overlay is written as PNG; give a .png file name")
    if masks_dir:
        p = Path(masks_dir)
        blocker = next((a for a in (p, *p.parents) if a.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise UsageError(f"--masks-dir {masks_dir}: {blocker} is not a directory")


def write_or_fail(path, writer, *args, **kwargs):
    """``writer(*args, **kwargs)``; an OS error (disk full, permission) becomes one line naming the file."""
    try:
        return writer(*args, **kwargs)
    except OSError as e:
        raise LegionError(f"{path}: cannot write ({e.strerror or e})") from None
