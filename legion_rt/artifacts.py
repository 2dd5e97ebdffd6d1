"""The artifact directory (``legion-rt export --out ART``): manifest loading and verification.

Layout and manifest fields: docs/FORMAT.md "Artifact directory". Before any graph is opened the runtime checks:

* ``manifest.json`` parses, ``format`` is ``legion_rt.artifacts`` and ``format_version`` is one this runtime knows;
* the required sections and graphs are present, every graph file is listed under ``files``;
* every listed file name is a plain relative path inside ART (no absolute path, no ``..``, no symlink leading out);
* every listed file exists, has the listed size and (``verify="full"``, the default) the listed sha256.

Any failure raises ``ArtifactError`` naming the file at fault. Hashing streams the files in 4 MiB chunks
(about 1-2 s per GB on one core); ``verify="size"`` skips the hashes for quick restarts of a trusted directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import ArtifactError, LegionError
from .manifest import Manifest


def read_json_object(path: Path, error: type[LegionError] = ArtifactError) -> dict:
    """A JSON file that must hold an object; anything else raises ``error`` with one line naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: not a JSON object")
    return data


REQUIRED_FILES = ("embed_tokens.npy", "tokenizer.json")
VERIFY_MODES = ("full", "size", "none")
_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class ArtifactDir:
    """A verified artifact directory: its ``root`` and its parsed, typed ``manifest``."""

    root: Path
    manifest: Manifest = field(repr=False)

    def path(self, name: str) -> Path:
        """Absolute path of a file listed in the manifest (already checked to be inside ``root``)."""
        return self.root / name

    def graph_path(self, graph: str) -> Path:
        return self.path(getattr(self.manifest.graphs, graph).file)


def sha256_file(path: Path, *, chunk: int = _CHUNK) -> str:
    """Hex sha256 of a file, read in chunks (constant memory for multi-GB graphs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def load_artifacts(root: str | os.PathLike, *, verify: str = "full") -> ArtifactDir:
    """Load and verify ``root``/manifest.json. ``verify``: "full" (sizes + sha256), "size" or "none"."""
    if verify not in VERIFY_MODES:
        raise ArtifactError(f"verify={verify!r}: must be one of {', '.join(VERIFY_MODES)}")
    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(f"{root}: not an artifact directory (missing or not a directory)")
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise ArtifactError(f"{mpath}: missing (is {root} an artifact directory made by `legion-rt export`?)")
    manifest = Manifest.from_json(read_json_object(mpath), str(mpath))
    for name in REQUIRED_FILES:
        if name not in manifest.files:
            raise ArtifactError(f"{mpath}: required file {name!r} is not listed under 'files'")

    real_root = root.resolve()
    for name, meta in manifest.files.items():
        _check_name(name, mpath)
        path = root / name
        if not _inside(path, real_root):
            raise ArtifactError(f"{path}: resolves outside the artifact directory {root}")
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        if verify == "none":
            continue
        size = path.stat().st_size
        if size != meta.bytes:
            raise ArtifactError(
                f"{path}: size {size} bytes, manifest says {meta.bytes} (modified or truncated)"
            )
        if verify == "full":
            digest = sha256_file(path)
            if digest != meta.sha256.lower():
                raise ArtifactError(f"{path}: sha256 mismatch (modified or corrupted; re-export)")
    return ArtifactDir(root=root, manifest=manifest)


def _check_name(name: Any, mpath: Path) -> None:
    if not isinstance(name, str) or not name:
        raise ArtifactError(f"{mpath}: file name {name!r} is not a string")
    p = PurePosixPath(name)
    if "\\" in name or p.is_absolute() or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ArtifactError(
            f"{mpath}: file name {name!r} is not a relative path inside the artifact directory"
        )
    if any(part in ("..", "") for part in name.split("/")) or ".." in p.parts:
        raise ArtifactError(f"{mpath}: file name {name!r} leaves the artifact directory ('..')")


def _inside(path: Path, real_root: Path) -> bool:
    try:
        path.resolve().relative_to(real_root)
        return True
    except ValueError:
        return False
