"""A fresh clone can follow every reference: no tracked file points outside the repository, every citation of
a docs/ file with a quoted section title names a heading of that file, every docs/ path mentioned exists, and
every relative Markdown link leads to a tracked file (and, with ``#anchor``, to one of its headings)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Spelled in pieces so that this file does not contain them itself.
FORBIDDEN = (
    "../" + "shared",  # the development machine's shared folder, relative
    "/" + "work" + "/",  # ... and by absolute path
    "LEGION_" + "REFERENCE.md",  # the reference document outside the repository (now docs/REFERENCE.md)
)
# A document of a "shared/" folder: CONTRACT.md, ARCHITECTURE.md, ...
_SHARED_DOC = re.compile(r"(?<![\w.-])" + "shared" + r"/[A-Z][A-Z_]*\.md")

# A docs/ file, then a space and a section title in double quotes (a bare file name counts when docs/ has it);
# the quotes may follow a closing backtick.
_CITATION = re.compile(r"(?<![\w/.-])((?:docs/)?[A-Za-z][\w-]*\.md)`?[ \t]+\"([^\"\n]+)\"")
_DOCS_PATH = re.compile(r"(?<![\w/.-])docs/[\w./-]+?\.md\b")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _tracked() -> list[str]:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout (or git is missing): the tracked files are unknown")
    return [p for p in out.decode("utf-8", "surrogateescape").split("\0") if p]


def _texts(paths: list[str]) -> dict[str, str]:
    """Tracked text files (binary files, with a NUL byte, are left out) that exist in the working tree."""
    out = {}
    for rel in paths:
        path = ROOT / rel
        if not path.is_file():  # deleted in the working tree, not yet committed
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        out[rel] = data.decode("utf-8", "replace")
    return out


def _outside_fences(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the Markdown lines outside fenced code blocks."""
    lines, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((n, line))
    return lines


def headings(markdown: str) -> list[str]:
    """Heading texts of a Markdown document (ATX headings outside code fences), backticks removed."""
    out = []
    for _, line in _outside_fences(markdown):
        m = _HEADING.match(line)
        if m:
            out.append(m.group(2).replace("`", "").strip())
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for h in headings(markdown):
        s = slug(h)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def problems(files: dict[str, str], tracked: set[str]) -> list[str]:
    """Every broken or outside reference in ``files`` (repository-relative POSIX path -> text)."""
    found = []
    tracked_dirs = {str(p) for t in tracked for p in PurePosixPath(t).parents}
    docs = {name: text for name, text in files.items() if name.startswith("docs/") and name.endswith(".md")}

    def exists(rel: str) -> bool:
        return rel in tracked or rel in tracked_dirs

    for name, text in sorted(files.items()):
        for n, line in enumerate(text.splitlines(), 1):
            where = f"{name}:{n}"
            for bad in FORBIDDEN:
                if bad in line:
                    found.append(f"{where}: points outside the repository ({bad!r})")
            for m in _SHARED_DOC.finditer(line):
                found.append(f"{where}: points outside the repository ({m.group(0)!r})")
            for m in _DOCS_PATH.finditer(line):
                if not exists(m.group(0)):
                    found.append(f"{where}: {m.group(0)} does not exist in the repository")
            for m in _CITATION.finditer(line):
                doc, section = m.group(1), m.group(2)
                target = doc if doc.startswith("docs/") else f"docs/{doc}"
                if target not in docs:
                    if doc.startswith("docs/"):
                        found.append(f"{where}: cites {doc}, which does not exist")
                    continue  # a bare README.md "..." or similar: not a docs/ citation
                if section not in headings(docs[target]):
                    found.append(f'{where}: cites {target} "{section}", which is not a heading of {target}')
        if not name.endswith(".md"):
            continue
        base = PurePosixPath(name).parent
        for n, line in _outside_fences(text):
            line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
            for m in _LINK.finditer(line):
                url = m.group(1)
                if _SCHEME.match(url):
                    continue
                path, _, frag = url.partition("#")
                target = name if not path else _normalize(base / path)
                if target is None or not exists(target):
                    found.append(f"{name}:{n}: link {url!r}: {path} is not a tracked file of the repository")
                    continue
                if frag and target.endswith(".md") and target in files:
                    if frag.lower() not in anchors(files[target]):
                        found.append(f"{name}:{n}: link {url!r}: no heading #{frag} in {target}")
    return found


def _normalize(p: PurePosixPath) -> str | None:
    """``a/b/../c`` -> ``a/c``; None when the path leaves the repository."""
    parts: list[str] = []
    for part in p.parts:
        if part in (".", ""):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


# ------------------------------------------------------------------------------------------------------- tests


def test_every_reference_stays_inside_the_repository():
    tracked = _tracked()
    found = problems(_texts(tracked), set(tracked))
    assert not found, "broken or outside references:\n" + "\n".join(found)


def test_the_docs_exist_and_are_cited():
    """The three documents are tracked, and the code really cites sections of them (the checker sees them)."""
    tracked = _tracked()
    for doc in ("docs/CONTRACT.md", "docs/REFERENCE.md", "docs/FORMAT.md"):
        assert doc in tracked, doc
    citations = [
        m.group(0)
        for text in _texts([t for t in tracked if t.endswith(".py")]).values()
        for m in _CITATION.finditer(text)
        if m.group(1).startswith("docs/")
    ]
    assert len(citations) >= 8, citations
    reference = headings((ROOT / "docs/REFERENCE.md").read_text(encoding="utf-8"))
    for section in ("Prompt", "Preprocessing", "Generation", "Text output", "Masks", "Detector", "Evaluation",
                    "Checkpoint layout", "Where this runtime differs"):  # fmt: skip
        assert section in reference, section


def test_the_checker_finds_each_kind_of_problem():
    """A synthetic repository with one problem of each kind: each is reported, a clean file is not."""
    doc = "# Title\n\n## Text output\n\n```\n## Not a heading\n```\n### `manifest.json`\n"
    files = {
        "DOCS/REFERENCE.md": doc,
        "ok.py": '# DOCS/REFERENCE.md "Text output" and DOCS/REFERENCE.md "manifest.json"; see [x](y)\n',
        "ok.md": "[a](DOCS/REFERENCE.md#text-output) [b](DOCS/REFERENCE.md#manifestjson) [c](https://e.x/q)\n"
        "[d](docs) `[e](missing.md)`\n```\n[f](missing.md)\n```\n",
        "a.py": "x = 1  # see ../" + "shared/" + "CONTRACT.md\n",
        "b.py": '"""From /' + "work/main/README.md." + '"""\n',
        "c.py": "# LEGION_" + 'REFERENCE.md "Prompt"\n',
        "d.py": '# DOCS/REFERENCE.md "Prompts"\n',
        "e.py": '# DOCS/REFERENCE.md "Not a heading"\n',
        "f.py": '# DOCS/MISSING.md "X" and DOCS/GONE.md\n',
        "g.md": "[g](missing.md) [h](../outside.md)\n",
        "h.md": "[i](DOCS/REFERENCE.md#no-such-heading)\n",
        "i.md": "see shared/" + "ARCHITECTURE.md\n",
    }
    # "DOCS/" stands for "docs/" so that this file does not cite missing sections itself
    files = {k.replace("DOCS/", "docs/"): v.replace("DOCS/", "docs/") for k, v in files.items()}
    found = problems(files, set(files) | {"y"})
    by_file: dict[str, list[str]] = {}
    for f in found:
        by_file.setdefault(f.split(":", 1)[0], []).append(f)
    assert set(by_file) == {"a.py", "b.py", "c.py", "d.py", "e.py", "f.py", "g.md", "h.md", "i.md"}, found
    # f.py: MISSING.md twice (as a path and as a citation) and GONE.md; g.md: two bad links
    assert len(by_file["f.py"]) == 3 and len(by_file["g.md"]) == 2, found
    assert slug("Where this runtime differs") == "where-this-runtime-differs"
    assert slug("legion_rt internals: who owns what") == "legion_rt-internals-who-owns-what"
