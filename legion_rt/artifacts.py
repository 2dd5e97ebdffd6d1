"""The artifact directory (``legion-rt export --out ART``): manifest loading and verification.

Layout and manifest fields: export/FORMAT.md "Artifact directory". Before any graph is opened the runtime checks:

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


FORMAT_NAME = "legion_rt.artifacts"
SUPPORTED_FORMAT_VERSIONS = (1,)
REQUIRED_GRAPHS = ("vision", "sam_encoder", "mask_head", "llm")
REQUIRED_FILES = ("embed_tokens.npy", "tokenizer.json")
REQUIRED_SECTIONS = ("model", "tokens", "prompt", "preprocess", "graphs", "files")
VERIFY_MODES = ("full", "size", "none")
_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class Artifacts:
    """A verified artifact directory. ``manifest`` is the parsed manifest.json; the other fields are views of it."""

    root: Path
    manifest: dict[str, Any] = field(repr=False)

    @property
    def format_version(self) -> int:
        return int(self.manifest["format_version"])

    @property
    def model(self) -> dict[str, Any]:
        return self.manifest["model"]

    @property
    def tokens(self) -> dict[str, int]:
        return self.manifest["tokens"]

    @property
    def prompt(self) -> dict[str, Any]:
        return self.manifest["prompt"]

    @property
    def preprocess(self) -> dict[str, Any]:
        return self.manifest["preprocess"]

    @property
    def graphs(self) -> dict[str, dict[str, Any]]:
        return self.manifest["graphs"]

    @property
    def has_detector(self) -> bool:
        return bool(self.manifest.get("detector", False))

    @property
    def precision(self) -> str:
        return str(self.manifest.get("precision", "fp32"))

    def path(self, name: str) -> Path:
        """Absolute path of a file listed in the manifest (already checked to be inside ``root``)."""
        return self.root / name

    def graph_path(self, graph: str) -> Path:
        return self.path(self.graphs[graph]["file"])


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


def load_artifacts(root: str | os.PathLike, *, verify: str = "full") -> Artifacts:
    """Load and verify ``root``/manifest.json. ``verify``: "full" (sizes + sha256), "size" or "none"."""
    if verify not in VERIFY_MODES:
        raise ArtifactError(f"verify={verify!r}: must be one of {', '.join(VERIFY_MODES)}")
    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(f"{root}: not an artifact directory (missing or not a directory)")
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise ArtifactError(f"{mpath}: missing (is {root} an artifact directory made by `legion-rt export`?)")
    manifest = read_json_object(mpath)
    if manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{mpath}: format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if type(version) is not int or version not in SUPPORTED_FORMAT_VERSIONS:  # not True, 1.0 or "1"
        raise ArtifactError(
            f"{mpath}: unknown format_version {version!r} (this legion_rt reads "
            f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); re-export with this version"
        )
    for sec in REQUIRED_SECTIONS:
        if not isinstance(manifest.get(sec), dict):
            raise ArtifactError(f"{mpath}: section {sec!r} missing or not an object")
    files: dict[str, Any] = manifest["files"]
    graphs: dict[str, Any] = manifest["graphs"]
    for g in REQUIRED_GRAPHS:
        entry = graphs.get(g)
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise ArtifactError(f"{mpath}: required graph {g!r} missing from 'graphs'")
        if entry["file"] not in files:
            raise ArtifactError(
                f"{mpath}: graph file {entry['file']!r} is not listed (with a hash) under 'files'"
            )
    for name in REQUIRED_FILES:
        if name not in files:
            raise ArtifactError(f"{mpath}: required file {name!r} is not listed under 'files'")

    real_root = root.resolve()
    for name, meta in files.items():
        _check_name(name, mpath)
        path = root / name
        if not _inside(path, real_root):
            raise ArtifactError(f"{path}: resolves outside the artifact directory {root}")
        if (
            not isinstance(meta, dict)
            or type(meta.get("bytes")) is not int  # a bool is an int to isinstance
            or meta["bytes"] < 0
            or not isinstance(meta.get("sha256"), str)
        ):
            raise ArtifactError(f"{mpath}: entry for {name!r} needs integer 'bytes' >= 0 and string 'sha256'")
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        if verify == "none":
            continue
        size = path.stat().st_size
        if size != meta["bytes"]:
            raise ArtifactError(
                f"{path}: size {size} bytes, manifest says {meta['bytes']} (modified or truncated)"
            )
        if verify == "full":
            digest = sha256_file(path)
            if digest != meta["sha256"].lower():
                raise ArtifactError(f"{path}: sha256 mismatch (modified or corrupted; re-export)")
    return Artifacts(root=root, manifest=manifest)


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
