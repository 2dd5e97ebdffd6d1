"""``legion-rt analyze`` over directories and globs: ``--jsonl`` (one Result line per picture, written as each
finishes), ``--keep-going`` (error lines, exit 1), ``--resume`` (pictures already in the file are skipped),
outputs named by relative path (``a/x.png`` and ``b/x.png`` do not collide), pictures decoded one at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

TOKENS = "2"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pic(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.random((1, 1, 3)) * 255
    Image.fromarray(np.clip(base + rng.normal(0, 30, (30, 40, 3)), 0, 255).astype(np.uint8)).save(path)
    return path


def _run(*args, cwd):
    """``python -m legion_rt analyze ...`` from ``cwd`` (relative picture names), importing this checkout."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("LEGION_RT_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "legion_rt", "analyze", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
    )


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def engine(tiny_artifacts):
    from legion_rt import Engine

    eng = Engine(tiny_artifacts, threads=1, verify="size")
    yield eng
    eng.close()


def test_folders_jsonl_collisions_keep_going_resume(tiny_artifacts, engine, tmp_path):
    root = tmp_path / "pics"
    _pic(root / "a" / "x.png", 1)
    _pic(root / "b" / "x.png", 2)
    _pic(root / "a" / "y.png", 3)
    trunc = root / "b" / "z.png"  # the header is fine, the pixels are cut: found only when decoded
    trunc.write_bytes((root / "a" / "y.png").read_bytes()[:80])
    (root / "b" / "junk.png").write_bytes(b"not a picture")  # found by the cheap header check
    opts = ["--artifacts", tiny_artifacts, "--max-new-tokens", TOKENS, "--threads", "1", "--verify", "size"]
    out = tmp_path / "out.jsonl"

    # without --keep-going the junk header fails the command before the model loads: nothing written
    p = _run("pics", *opts, "--jsonl", out, cwd=tmp_path)
    assert p.returncode == 1 and "junk.png" in p.stderr and "Traceback" not in p.stderr
    assert not out.exists()

    p = _run(
        "pics",
        *opts,
        "--jsonl",
        out,
        "--keep-going",
        "--overlay",
        "ov/o.png",
        "--masks-dir",
        "m",
        cwd=tmp_path,
    )
    assert p.returncode == 1, p.stderr
    assert "2 of 5 pictures failed" in p.stderr
    docs = _lines(out)
    by_image = {d["image"]: d for d in docs}
    assert sorted(by_image) == [
        "pics/a/x.png",
        "pics/a/y.png",
        "pics/b/junk.png",
        "pics/b/x.png",
        "pics/b/z.png",
    ]
    assert (
        set(by_image["pics/b/junk.png"]) == {"image", "error"}
        and "junk.png" in by_image["pics/b/junk.png"]["error"]
    )
    assert set(by_image["pics/b/z.png"]) == {"image", "error"}
    for name in ("pics/a/x.png", "pics/b/x.png", "pics/a/y.png"):
        d = by_image[name]
        want = engine.analyze(tmp_path / name, max_new_tokens=int(TOKENS))
        assert d["verdict"] == want.verdict and d["token_ids"] == want.token_ids
        assert d["fake_probability"] == want.fake_probability and d["image_size"] == list(want.image_size)
    assert by_image["pics/a/x.png"]["fake_probability"] != by_image["pics/b/x.png"]["fake_probability"]
    # outputs named by relative path: the two x.png do not overwrite each other
    overlays = sorted(q.name for q in (tmp_path / "ov").iterdir())
    assert overlays == ["o-pics%2Fa%2Fx.png.png", "o-pics%2Fa%2Fy.png.png", "o-pics%2Fb%2Fx.png.png"]
    ax = np.asarray(Image.open(tmp_path / "ov" / overlays[0]))
    bx = np.asarray(Image.open(tmp_path / "ov" / overlays[2]))
    assert not np.array_equal(ax, bx)
    unions = sorted(q.name for q in (tmp_path / "m").iterdir() if q.name.endswith("_union.png"))
    assert unions == [
        "pics%2Fa%2Fx.png_union.png",
        "pics%2Fa%2Fy.png_union.png",
        "pics%2Fb%2Fx.png_union.png",
    ]

    # --resume: nothing new for the done ones; the failed ones are tried again (and fail again)
    p = _run("pics", *opts, "--jsonl", out, "--keep-going", "--resume", cwd=tmp_path)
    assert p.returncode == 1 and "3 pictures already in" in p.stderr, p.stderr
    again = _lines(out)[len(docs) :]
    assert sorted(d["image"] for d in again) == ["pics/b/junk.png", "pics/b/z.png"]
    assert all("error" in d for d in again)
    # a new picture and a glob: only it runs
    _pic(root / "c" / "new.png", 4)
    p = _run("pics/**/*.png", *opts, "--jsonl", out, "--keep-going", "--resume", cwd=tmp_path)
    new = [d for d in _lines(out)[len(docs) + 2 :] if "error" not in d]
    assert [d["image"] for d in new] == ["pics/c/new.png"], p.stderr
    # --resume without --jsonl is a usage error
    assert _run("pics", *opts, "--resume", cwd=tmp_path).returncode == 2


def test_jsonl_lines_are_written_as_each_picture_finishes(tiny_artifacts, tmp_path):
    """A picture that fails at decoding (no --keep-going) ends the run with exit 1; the pictures before it are
    already in the file, and the failing one was decoded only after them (one at a time)."""
    _pic(tmp_path / "d" / "a.png", 1)
    _pic(tmp_path / "d" / "b.png", 2)
    (tmp_path / "d" / "c.png").write_bytes((tmp_path / "d" / "a.png").read_bytes()[:80])  # truncated
    out = tmp_path / "o.jsonl"
    p = _run(
        "d",
        "--artifacts",
        tiny_artifacts,
        "--max-new-tokens",
        TOKENS,
        "--jsonl",
        out,
        "--threads",
        "1",
        cwd=tmp_path,
    )
    assert p.returncode == 1 and "c.png" in p.stderr and len(p.stderr.strip().splitlines()) >= 1
    assert [d["image"] for d in _lines(out)] == ["d/a.png", "d/b.png"]
    # one picture that fails only when decoded: exit 1 with exactly one stderr line, as before (decoded before
    # the model loads)
    p = _run("d/c.png", "--artifacts", tiny_artifacts, "--max-new-tokens", TOKENS, cwd=tmp_path)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [p.stderr.strip()] and "c.png" in p.stderr
    # --json of a single picture stays one object
    js = tmp_path / "one.json"
    p = _run("d/a.png", "--artifacts", tiny_artifacts, "--max-new-tokens", TOKENS, "--json", js, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    doc = json.loads(js.read_text())
    assert isinstance(doc, dict) and doc["image"] == "d/a.png" and len(doc["token_ids"]) == int(TOKENS)


def test_decoding_is_lazy(tiny_artifacts, tmp_path, monkeypatch):
    """run_analyze decodes each picture just before it runs and keeps no decoded picture afterwards."""
    import legion_rt.image as image_mod
    from legion_rt import Engine
    from legion_rt.analyze import run_analyze
    from legion_rt.outputs import JsonlWriter

    paths = [str(_pic(tmp_path / f"p{i}.png", i)) for i in range(4)]
    real = image_mod.load_image
    log = []

    def spy(src, **kw):
        log.append(("decode", str(src)))
        return real(src, **kw)

    monkeypatch.setattr(image_mod, "load_image", spy)

    class Writer(JsonlWriter):
        def write(self, doc):
            log.append(("line", doc.get("image")))
            super().write(doc)

    eng = Engine(tiny_artifacts, threads=1, verify="size")
    with Writer(tmp_path / "x.jsonl") as w:
        failed = run_analyze(
            eng,
            paths,
            None,
            json_path=None,
            overlay_path=None,
            masks_dir=None,
            opts={"max_new_tokens": 1},
            quiet=True,
            show_text=False,
            jsonl=w,
        )
    eng.close()
    assert failed == 0
    assert log == [x for p in paths for x in (("decode", p), ("line", p))]
