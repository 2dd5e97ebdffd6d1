"""Robustness sweep: bad pictures, bad arrays, odd PIL modes, tampered artifact directories and bad option values
must give a typed ``LegionError`` with one line naming the file or value: never a crash, a hang, a partial output
file or a traceback from the CLI (docs/CONTRACT.md "Exit status").

Choices made here (and why):

* Truncated JPEG: OpenCV's ``imread`` (the reference) returns a picture with the missing rows filled gray
  ("Premature end of JPEG file"); we raise ``ImageError`` instead (tests/test_image.py pins this): an explanation
  and masks computed on a gray-filled half picture would be silently wrong. Truncated PNG: OpenCV yields
  nothing, we raise ``ImageError`` too, so here we follow the reference.
* Animated GIF: the first frame, as OpenCV's ``imread``.
* ``--json``/``--overlay`` into a missing directory: the directory is created (tests/test_cli.py relies on it);
  a path that is a directory, or under a plain file, is refused before the model runs (exit 2).
* ``--overlay`` is always PNG: another extension is a usage error rather than a PNG under a misleading name.

Most CLI cases run ``legion_rt.cli.main`` in-process (same code as ``python -m legion_rt``, captured stderr);
a few run a real subprocess where the process boundary matters (non-UTF-8 argv, traceback text).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import legion_rt
from legion_rt import cli
from legion_rt.errors import ArtifactError, BackendError, ImageError
from legion_rt.image import load_image

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------- helpers
def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose IHDR declares w x h RGB pixels, with a tiny IDAT: decoding it would need w*h*3 bytes."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _jpeg_declaring(w: int, h: int) -> bytes:
    """A valid 16x16 JPEG whose SOF0 frame header is patched to declare w x h."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    i = data.find(b"\xff\xc0")
    data[i + 5 : i + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def _encoded(fmt: str, size=(64, 48)) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def _bad_picture(kind: str, d: Path) -> Path:
    """Write one kind of bad picture under ``d``; returns its path."""
    if kind == "directory":
        p = d / "dir.png"
        p.mkdir()
        return p
    if kind == "missing":
        return d / "missing.png"
    contents = {
        "empty": ("empty.png", b""),
        "png-signature-only": ("sig.png", b"\x89PNG\r\n\x1a\n"),
        "png-bomb": ("bomb.png", _png_header_only(100_000, 100_000)),
        "jpeg-bomb": ("bomb.jpg", _jpeg_declaring(60_000, 60_000)),
        "truncated-jpeg": ("trunc.jpg", _encoded("JPEG")[: len(_encoded("JPEG")) // 2]),
        "truncated-jpeg-header": ("trunc_hdr.jpg", _encoded("JPEG")[:200]),
        "truncated-png": ("trunc.png", _encoded("PNG")[: len(_encoded("PNG")) // 2]),
        "svg": ("pic.png", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'),
        "text": ("pic.jpg", b"hello\n"),
    }
    name, data = contents[kind]
    p = d / name
    p.write_bytes(data)
    return p


BAD_PICTURES = {
    # kind: words the one error line must contain (besides the file name)
    "directory": "is a directory",
    "missing": "no such image file",
    "empty": "empty file",
    "png-signature-only": "cannot decode",
    "png-bomb": "limit",
    "jpeg-bomb": "limit",
    "truncated-jpeg": "truncated",
    "truncated-jpeg-header": "cannot decode",
    "truncated-png": "truncated",
    "svg": "cannot decode",
    "text": "cannot decode",
}


def _run_main(capsys, *args) -> tuple[int, list[str], str]:
    """``legion-rt ARGS`` in-process: (exit status, stderr lines, stdout)."""
    rc = cli.main([str(a) for a in args])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err, cap.err
    return rc, cap.err.splitlines(), cap.out


def _assert_one_error(rc: int, lines: list[str], status: int, *needles: str) -> None:
    assert rc == status, lines
    assert len(lines) == 1, lines  # nothing else: bad input fails before the "backend:" info line
    assert lines[0].startswith("legion-rt: error: "), lines
    for n in needles:
        assert n in lines[0], (n, lines[0])


# ------------------------------------------------------------------------------------------- bad pictures
@pytest.mark.parametrize("kind", sorted(BAD_PICTURES))
def test_bad_picture_api(tmp_path, kind):
    path = _bad_picture(kind, tmp_path)
    with pytest.raises(ImageError) as e:
        load_image(path)
    msg = str(e.value)
    assert str(path) in msg and BAD_PICTURES[kind] in msg and "\n" not in msg, msg


@pytest.mark.parametrize("kind", sorted(BAD_PICTURES))
def test_bad_picture_cli(tmp_path, capsys, kind):
    """Fails before any artifact is read (ART does not even exist), writes no --json/--overlay file."""
    path = _bad_picture(kind, tmp_path)
    js, ov = tmp_path / "out.json", tmp_path / "o.png"
    rc, lines, out = _run_main(
        capsys, "analyze", path, "--artifacts", tmp_path / "no-art", "--json", js, "--overlay", ov
    )
    if (
        kind == "directory"
    ):  # since issue 9 `analyze` takes directories (recursively): an empty one is a usage error
        _assert_one_error(rc, lines, 2, str(path), "no pictures in this directory")
    else:
        _assert_one_error(rc, lines, 1, str(path), BAD_PICTURES[kind])
    assert out == "" and not js.exists() and not ov.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files


def test_bomb_refused_before_decoding(tmp_path, monkeypatch):
    """9000x9000 is under Pillow's own bomb limit but over ours: refused from the header, no pixel decoded."""
    from PIL import ImageFile

    def no_decode(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    for name, data in (("b.png", _png_header_only(9000, 9000)), ("b.jpg", _jpeg_declaring(9000, 9000))):
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(ImageError, match=r"9000x9000 = 81000000 pixels, over the limit"):
            load_image(p)


def test_bad_picture_subprocess_no_traceback(tmp_path):
    """The real process: one line, exit 1, no traceback (the in-process tests cover the other kinds)."""
    bomb = _bad_picture("png-bomb", tmp_path)
    p = subprocess.run(
        [sys.executable, "-m", "legion_rt", "analyze", str(bomb), "--artifacts", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.splitlines() == [p.stderr.strip()] and str(bomb) in p.stderr


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="running as root: chmod 000 does not stop root from reading, so the case cannot be produced",
)
def test_unreadable_file(tmp_path):
    p = tmp_path / "noperm.png"
    p.write_bytes(_encoded("PNG"))
    p.chmod(0)
    try:
        with pytest.raises(ImageError, match=r"noperm.png: cannot read \(Permission denied\)"):
            load_image(p)
    finally:
        p.chmod(0o600)


def test_empty_path_and_unknown_bytes():
    with pytest.raises(ImageError, match=r"^<empty path>: empty image path$"):
        load_image("")
    with pytest.raises(ImageError, match=r"^<2 bytes>: cannot decode image \(not a picture format"):
        load_image(b"xx")


def test_odd_but_valid_pictures_match_opencv(tmp_path):
    """Animated GIF (first frame), 1x1 PNG and a non-UTF-8 file name decode as OpenCV's imread does."""
    cv2 = pytest.importorskip("cv2", reason="OpenCV (the reference's decoder) is needed for the comparison")
    frames = [Image.new("RGB", (32, 24), c) for c in ((250, 10, 10), (10, 250, 10))]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    one = tmp_path / "one.png"
    Image.new("RGB", (1, 1), (9, 19, 29)).save(one)
    odd = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/bad\xffname.png"))  # surrogate-escaped str
    shutil.copyfile(one, odd)
    # OpenCV 5.0's imread segfaults on a str holding a surrogate escape (a non-UTF-8 name): the reference
    # cannot open such a file at all; we read it, and compare with the same bytes under a plain name.
    for p, plain in ((gif, gif), (one, one), (odd, one)):
        np.testing.assert_array_equal(load_image(p), cv2.imread(str(plain))[:, :, ::-1])


def test_non_utf8_name_cli(tmp_path, tiny_artifacts, capsys):
    odd = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/bad\xffname.png"))
    Image.new("RGB", (1, 1), (9, 19, 29)).save(odd, format="PNG")
    js = tmp_path / "r.json"
    rc, lines, _ = _run_main(
        capsys,
        "analyze",
        odd,
        "--artifacts",
        tiny_artifacts,
        "--max-new-tokens",
        "2",
        "--json",
        js,
        "--quiet",
    )
    assert rc == 0, lines
    doc = json.loads(js.read_text())
    assert doc["image"] == str(tmp_path) + "/bad\\xffname.png" and len(doc["token_ids"]) <= 2


# --------------------------------------------------------------------------------------- arrays and PIL
@pytest.fixture(scope="module")
def engine(tiny_artifacts):
    with legion_rt.Engine(tiny_artifacts, threads=1) as eng:
        yield eng


_RGB = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "label,array",
    [
        ("float32", _RGB.astype(np.float32)),
        ("float64-unit", _RGB / 255.0),
        ("bool", _RGB > 100),
        ("int64", _RGB.astype(np.int64)),
        ("rgba", np.concatenate([_RGB, _RGB[:, :, :1]], axis=2)),
        ("hw1", _RGB[:, :, :1]),
        ("flat", _RGB.ravel()),
        ("batched", _RGB[None]),
        ("zero-sized", np.zeros((0, 0, 3), np.uint8)),
        ("too-elongated", np.zeros((1, 5000, 3), np.uint8)),
    ],
)
def test_bad_arrays(engine, label, array):
    with pytest.raises(ImageError) as e:
        engine.analyze(array, max_new_tokens=2)
    msg = str(e.value)
    assert f"shape={tuple(array.shape)}" in msg and str(array.dtype) in msg and "\n" not in msg, msg


def test_strided_arrays_same_result(engine):
    """Non-contiguous, Fortran-ordered and read-only arrays give the same answer as the contiguous picture."""
    wide = np.repeat(_RGB, 2, axis=1)  # [40, 100, 3]; [:, ::2] is _RGB as a strided view
    readonly = np.frombuffer(_RGB.tobytes(), np.uint8).reshape(_RGB.shape)
    base = engine.analyze(_RGB, max_new_tokens=3)
    for a in (wide[:, ::2], np.asfortranarray(_RGB), readonly):
        r = engine.analyze(a, max_new_tokens=3)
        assert r.token_ids == base.token_ids and r.fake_probability == base.fake_probability
        np.testing.assert_array_equal(r.mask, base.mask)


def test_one_pixel_picture(engine):
    r = engine.analyze(np.full((1, 1, 3), 7, np.uint8), max_new_tokens=2)
    assert r.mask.shape == (1, 1) and r.mask.dtype == bool


def _pil(mode: str) -> Image.Image:
    rng = np.random.default_rng(2)
    if mode == "P-transparent":
        im = Image.fromarray(rng.integers(0, 4, (10, 20), dtype=np.uint8), "L").convert("P")
        im.info["transparency"] = 0
        return im
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65536, (10, 20), dtype=np.uint16))
        assert im.mode == "I;16", im.mode
        return im
    if mode == "F":
        return Image.fromarray(rng.random((10, 20)).astype(np.float32))  # mode F
    return Image.fromarray(rng.integers(0, 256, (10, 20, 3), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize("mode", ["I;16", "P-transparent", "LA", "CMYK", "1", "L", "RGBA", "YCbCr"])
def test_pil_modes(mode):
    rgb = load_image(_pil(mode))
    assert rgb.shape == (10, 20, 3) and rgb.dtype == np.uint8 and rgb.flags.c_contiguous


def test_pil_float_mode_refused():
    """Mode F (32-bit float) has no OpenCV imread counterpart for an 8-bit colour picture: refused, typed."""
    with pytest.raises(ImageError, match=r"<PIL.Image mode=F size=20x10>: unsupported pixel format 'F'"):
        load_image(_pil("F"))


@pytest.mark.parametrize("bad", [None, 3, [1, 2], object()])
def test_unsupported_input_types(bad):
    with pytest.raises(ImageError, match="unsupported image input type"):
        load_image(bad)


# ---------------------------------------------------------------------------------------- artifact dirs
def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` to a fresh inode (the copies are hard links to the shared session artifacts)."""
    path.unlink()
    path.write_bytes(data)


def _rehash(m: dict, name: str, data: bytes) -> None:
    m["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _garbage(graph: str):
    def mutate(d: Path, m: dict):
        name = m["graphs"][graph]["file"]
        data = b"not an onnx graph" * 50
        _replace(d / name, data)
        _rehash(m, name, data)
        return m

    return mutate


def _set(path: list, value):
    def mutate(d: Path, m: dict):
        node = m
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        return m

    return mutate


def _add_file(name: str):
    def mutate(d: Path, m: dict):
        m["files"][name] = {"bytes": 1, "sha256": "0" * 64}
        return m

    return mutate


def _symlink_out(d: Path, m: dict):
    (d / "tokenizer.json").unlink()
    os.symlink("/etc/hostname", d / "tokenizer.json")
    return m


def _garbage_embed(d: Path, m: dict):
    data = b"\x93NUMPY garbage"
    _replace(d / "embed_tokens.npy", data)
    _rehash(m, "embed_tokens.npy", data)
    return m


ARTIFACT_CASES = {
    # case: (mutation of (dir, manifest) -> manifest | text | None, error type, words in the message)
    "missing-manifest": (
        lambda d, m: (d / "manifest.json").unlink(),
        ArtifactError,
        "manifest.json: missing",
    ),
    "manifest-not-json": (lambda d, m: "{not json", ArtifactError, "not valid JSON"),
    "manifest-list": (lambda d, m: [1, 2], ArtifactError, "not a JSON object"),
    "manifest-not-utf8": (lambda d, m: b"\xff\xfe{", ArtifactError, "not valid JSON"),
    "dotdot-file": (_add_file("../outside.bin"), ArtifactError, "leaves the artifact directory"),
    "absolute-file": (_add_file("/etc/hostname"), ArtifactError, "not a relative path"),
    "symlink-out": (_symlink_out, ArtifactError, "tokenizer.json: resolves outside"),
    "negative-bytes": (
        _set(["files", "vision.onnx", "bytes"], -5),
        ArtifactError,
        "vision.onnx.bytes: must be >= 0",
    ),
    "bool-bytes": (
        _set(["files", "vision.onnx", "bytes"], True),
        ArtifactError,
        "vision.onnx.bytes: expected an integer",
    ),
    "huge-bytes": (_set(["files", "vision.onnx", "bytes"], 10**30), ArtifactError, "vision.onnx: size"),
    "format-version-1": (_set(["format_version"], 1), ArtifactError, "unknown format_version 1"),
    "format-version-3": (_set(["format_version"], 3), ArtifactError, "unknown format_version 3"),
    "format-version-true": (_set(["format_version"], True), ArtifactError, "unknown format_version True"),
    "format-version-float": (_set(["format_version"], 2.0), ArtifactError, "unknown format_version 2.0"),
    "garbage-vision": (_garbage("vision"), BackendError, "vision.onnx: cannot create"),
    "garbage-sam-encoder": (_garbage("sam_encoder"), BackendError, "sam_encoder.onnx: cannot create"),
    "garbage-mask-head": (_garbage("mask_head"), BackendError, "mask_head.onnx: cannot create"),
    "garbage-llm": (_garbage("llm"), BackendError, "llm.onnx: cannot create"),
    "garbage-embed-table": (_garbage_embed, ArtifactError, "embed_tokens.npy: cannot read"),
    "prefix-id-too-big": (_set(["prompt", "prefix_ids"], [10**9]), ArtifactError, "token id 1000000000"),
    "prefix-id-negative": (_set(["prompt", "prefix_ids"], [-1]), ArtifactError, "token id -1 outside"),
    "eos-not-int": (
        _set(["tokens", "eos"], "x"),
        ArtifactError,
        "manifest.json: tokens.eos: expected an integer",
    ),
}


def _tampered(tiny_artifacts: Path, dest: Path, mutate) -> Path:
    """A hard-linked copy of the artifacts with its own manifest, changed by ``mutate``."""
    shutil.copytree(tiny_artifacts, dest, copy_function=os.link)
    mpath = dest / "manifest.json"
    m = json.loads(mpath.read_text())
    mpath.unlink()  # own inode: never edit the shared session manifest
    mpath.write_text(json.dumps(m))
    new = mutate(dest, m)
    if new is not None:
        mpath.unlink()
        if isinstance(new, bytes):
            mpath.write_bytes(new)
        else:
            mpath.write_text(new if isinstance(new, str) else json.dumps(new))
    return dest


@pytest.mark.parametrize("case", sorted(ARTIFACT_CASES))
def test_bad_artifacts(tmp_path, tiny_artifacts, case):
    mutate, err, words = ARTIFACT_CASES[case]
    art = _tampered(Path(tiny_artifacts), tmp_path / "art", mutate)
    with pytest.raises(err) as e:
        legion_rt.Engine(art, threads=1)
    msg = str(e.value)
    assert str(art) in msg and words in msg and "\n" not in msg, msg


def test_bad_artifacts_cli(tmp_path, tiny_artifacts, capsys):
    """ORT's load failure through the CLI: one line naming the graph file, exit 1, no output file."""
    art = _tampered(Path(tiny_artifacts), tmp_path / "art", _garbage("llm"))
    picture = tmp_path / "p.png"
    Image.new("RGB", (8, 8)).save(picture)
    js = tmp_path / "r.json"
    rc, lines, _ = _run_main(capsys, "analyze", picture, "--artifacts", art, "--json", js, "--quiet")
    _assert_one_error(rc, lines, 1, str(art / "llm.onnx"))
    assert not js.exists()


# ------------------------------------------------------------------------------------------ option values
OPTION_CASES = {
    # case: (extra args, words in the one error line); all exit 2 (usage) before the model runs
    "max-new-tokens-huge": (["--max-new-tokens", "99999999999999"], "max_new_tokens=99999999999999"),
    "max-new-tokens-negative": (["--max-new-tokens", "-3"], "'-3' must be >= 1"),
    "max-new-tokens-zero": (["--max-new-tokens", "0"], "'0' must be >= 1"),
    "max-new-tokens-float": (["--max-new-tokens", "2.5"], "'2.5' is not an integer"),
    "skip-if-real-2": (["--skip-if-real", "2"], "--skip-if-real: '2' must be in [0, 1]"),
    "skip-if-real-nan": (["--skip-if-real", "nan"], "'nan'"),
    "temperature-inf": (["--temperature", "inf"], "temperature=inf"),
    "threads-zero": (["--threads", "0"], "--threads: '0'"),
    "backend-unknown": (["--backend", "cuda"], "--backend"),
    "providers-unknown": (["--providers", "foo"], "provider 'foo'"),
    "json-is-directory": (["--json", "{tmp}"], "--json {tmp}: is a directory"),
    "json-under-a-file": (["--json", "{pic}/r.json"], "is not a directory"),
    "overlay-is-directory": (["--overlay", "{tmp}"], "--overlay {tmp}: is a directory"),
    "overlay-unknown-extension": (["--overlay", "{tmp}/o.xyz"], "o.xyz: the overlay is written as PNG"),
    "masks-dir-is-a-file": (["--masks-dir", "{pic}"], "--masks-dir {pic}: {pic} is not a directory"),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_bad_options_cli(tmp_path, tiny_artifacts, capsys, case):
    extra, words = OPTION_CASES[case]
    picture = tmp_path / "p.png"
    Image.new("RGB", (8, 8)).save(picture)
    fill = {"tmp": str(tmp_path), "pic": str(picture)}
    before = sorted(os.listdir(tmp_path))
    args = ["analyze", picture, "--artifacts", tiny_artifacts, "--quiet"]
    rc, lines, out = _run_main(capsys, *args, *[a.format(**fill) for a in extra])
    _assert_one_error(rc, lines, 2, words.format(**fill))
    assert out == "" and sorted(os.listdir(tmp_path)) == before  # nothing written, no temp file left


@pytest.mark.parametrize(
    "args,words",
    [
        (["serve", "--artifacts", "{tmp}", "--port", "99999"], "--port: '99999' must be in [0, 65535]"),
        (["serve", "--artifacts", "{tmp}", "--port", "-1"], "--port: '-1' must be in [0, 65535]"),
        (["make-tiny", "--out", "{pic}"], "--out {pic}: exists and is not a directory"),
        ([], "required: COMMAND"),
    ],
)
def test_other_commands_bad_values(tmp_path, capsys, args, words):
    picture = tmp_path / "p.png"
    picture.write_bytes(b"x")
    fill = {"tmp": str(tmp_path), "pic": str(picture)}
    rc, lines, _ = _run_main(capsys, *[a.format(**fill) for a in args])
    _assert_one_error(rc, lines, 2, words.format(**fill))


def test_usage_error_subprocess_one_line():
    """argparse's own errors (a bad value, a missing option) are one line too, exit 2."""
    for args in (["analyze", "x.png", "--artifacts", "a", "--max-new-tokens", "-3"], ["analyze", "x.png"]):
        p = subprocess.run(
            [sys.executable, "-m", "legion_rt", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert p.returncode == 2 and len(p.stderr.splitlines()) == 1, p.stderr
        assert p.stderr.startswith("legion-rt: error: ") and "analyze --help" in p.stderr, p.stderr


def test_json_into_missing_directory_is_created(tmp_path, tiny_artifacts, capsys):
    """Documented choice (tests/test_cli.py relies on it): missing parent directories of --json are created."""
    picture = tmp_path / "p.png"
    Image.new("RGB", (8, 8)).save(picture)
    js = tmp_path / "new" / "dir" / "r.json"
    rc, lines, _ = _run_main(
        capsys,
        "analyze",
        picture,
        "--artifacts",
        tiny_artifacts,
        "--max-new-tokens",
        "2",
        "--json",
        js,
        "--quiet",
    )
    assert rc == 0 and lines == [], lines
    assert json.loads(js.read_text())["image"] == str(picture)
    assert [p.name for p in js.parent.iterdir()] == ["r.json"]  # no temp file left beside it


def test_write_failure_is_one_line(tmp_path, tiny_artifacts, capsys, monkeypatch):
    """An OS error while writing an output (disk full...) after the model ran: one line naming the file."""
    from legion_rt import overlay

    def full(path, obj):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(overlay, "atomic_write_json", full)
    picture = tmp_path / "p.png"
    Image.new("RGB", (8, 8)).save(picture)
    js = tmp_path / "r.json"
    rc, lines, _ = _run_main(
        capsys,
        "analyze",
        picture,
        "--artifacts",
        tiny_artifacts,
        "--max-new-tokens",
        "2",
        "--json",
        js,
        "--quiet",
    )
    _assert_one_error(rc, lines, 1, f"{js}: cannot write (No space left on device)")
    assert not js.exists()
