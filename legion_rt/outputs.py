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
        if path:
            _check_file_path(opt, path)
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


class JsonlWriter:
    """One JSON document per line, appended and flushed as each is written, so a later failure (or Ctrl-C)
    leaves every line written so far intact. ``path`` "-" writes to stdout. A file whose last line was cut
    short (a killed run) gets a newline first, so the next line starts on a line of its own."""

    def __init__(self, path: str | os.PathLike, *, append: bool = True):
        self.path = path
        if os.fspath(path) == "-":
            self._f = sys.stdout
            self._own = False
            return
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._f = open(p, "a" if append else "w", encoding="utf-8")  # noqa: SIM115
            if append and p.stat().st_size > 0:
                with open(p, "rb") as r:
                    r.seek(-1, os.SEEK_END)
                    if r.read(1) != b"\n":
                        self._f.write("\n")
        except OSError as e:
            raise LegionError(f"{path}: cannot write ({e.strerror or e})") from None
        self._own = True

    def write(self, doc: dict[str, Any]) -> None:
        try:
            line = json.dumps(doc, ensure_ascii=False, allow_nan=False, default=_json_default)
        except ValueError:  # a NaN or infinity somewhere: null, so that every line stays valid JSON
            line = json.dumps(_finite(doc), ensure_ascii=False, allow_nan=False, default=_json_default)
        try:
            self._f.write(line + "\n")
            self._f.flush()
        except OSError as e:
            raise LegionError(f"{self.path}: cannot write ({e.strerror or e})") from None

    def close(self) -> None:
        if self._own and not self._f.closed:
            self._f.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _finite(o: Any) -> Any:
    if isinstance(o, float) and (o != o or o in (float("inf"), float("-inf"))):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def read_done(path: str | os.PathLike) -> set[str]:
    """The ``"image"`` names that already have a result line in a JSON Lines file (``--resume``). Error lines
    (``{"image", "error"}``) do not count: those pictures are tried again. A missing file is empty; a line that is
    not JSON (a run killed mid-line) is ignored."""
    done: set[str] = set()
    p = Path(path)
    if not p.is_file():
        return done
    with open(p, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and isinstance(doc.get("image"), str) and "error" not in doc:
                done.add(doc["image"])
    return done


def check_jsonl_path(opt: str, path) -> None:
    """A --jsonl path that cannot be a file is a usage error, before any work ("-" is stdout)."""
    if path and os.fspath(path) != "-":
        _check_file_path(opt, path)


def _check_file_path(opt: str, path) -> None:
    """``path`` can become a file: not a directory, and no existing file where a parent directory must be."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{opt} {path}: is a directory; give a file name")
    parent = next((a for a in p.parents if a.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"{opt} {path}: {parent} is not a directory")
