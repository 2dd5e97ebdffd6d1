"""Streams and folders without a model: picture argument expansion and header checks, collision-free output
names, JSON Lines writing and resuming, the change measure of ``watch``, sampling, colour order, frame sources
and the missing-extra message. Quick (no model, no export)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from legion_rt.errors import ImageError, LegionError, RequestError, UsageError
from legion_rt.image import load_image
from legion_rt.inputs import check_header, expand, output_key
from legion_rt.outputs import JsonlWriter, read_done
from legion_rt.sources import Frame, open_source
from legion_rt.watch import _Sampler, frame_change, thumbnail


def _pic(path, seed=0, size=(20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(path)
    return path


def test_expand_files_directories_globs(tmp_path, monkeypatch):
    """Directories recursively (picture extensions, hidden skipped, sorted), globs, files as given, each once."""
    _pic(tmp_path / "d" / "b.png")
    _pic(tmp_path / "d" / "a.JPG")
    _pic(tmp_path / "d" / "sub" / "c.png")
    (tmp_path / "d" / "notes.txt").write_text("x")
    _pic(tmp_path / "d" / ".hidden" / "h.png")
    _pic(tmp_path / "g" / "x1.png")
    _pic(tmp_path / "g" / "x2.png")
    monkeypatch.chdir(tmp_path)
    got = expand(["d", "g/x*.png", "d/b.png", "d/sub/c.png"])
    assert got == ["d/a.JPG", "d/b.png", "d/sub/c.png", "g/x1.png", "g/x2.png"]
    assert expand(["d/**/*.png"]) == ["d/b.png", "d/sub/c.png"]
    with pytest.raises(UsageError, match="nothing.*|matches no picture"):
        expand(["g/none*.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no pictures"):
        expand(["empty"])
    assert expand(["missing.png"]) == ["missing.png"]  # named explicitly: the header check names it


def test_check_header_is_cheap_and_names_the_file(tmp_path):
    good = _pic(tmp_path / "good.png", size=(40, 50))
    assert check_header(str(good)) == (50, 40)
    with pytest.raises(ImageError, match="over the limit"):
        check_header(str(good), max_pixels=100)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not a picture")
    with pytest.raises(ImageError, match="junk.jpg"):
        check_header(str(junk))
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        check_header(str(tmp_path / "empty.png"))
    with pytest.raises(ImageError, match="no such"):
        check_header(str(tmp_path / "missing.png"))
    # a truncated file passes the header check (only decoding finds it): no pixel is decoded here
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:60])
    assert check_header(str(trunc)) == (50, 40)


def test_output_keys_never_collide():
    paths = ["a/x.jpg", "b/x.jpg", "a/x.png", "a%2Fx.jpg", "a_x.jpg", "./a/x.jpg", "/abs/a/x.jpg", "x.jpg"]
    keys = [output_key(p) for p in paths]
    assert keys[0] == keys[5] == "a%2Fx.jpg"  # the same file
    distinct = [k for i, k in enumerate(keys) if i != 5]
    assert len(set(distinct)) == len(distinct)
    assert all("/" not in k for k in keys)


def test_jsonl_appends_flushes_and_repairs_a_cut_line(tmp_path):
    f = tmp_path / "out.jsonl"
    w = JsonlWriter(f)
    w.write({"image": "a.png", "verdict": "fake"})
    assert f.read_text().count("\n") == 1  # flushed at once, before close
    w.close()
    with open(f, "a") as h:
        h.write('{"image": "b.png", "verd')  # a run killed mid-line
    with JsonlWriter(f) as w:
        w.write({"image": "c.png", "error": "bad"})
        w.write({"image": "d.png", "verdict": "real", "x": np.float32(0.5), "t": {"a": float("nan")}})
    lines = f.read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[2]) == {"image": "c.png", "error": "bad"}
    assert json.loads(lines[3])["t"] == {"a": None} and json.loads(lines[3])["x"] == 0.5
    assert read_done(f) == {"a.png", "d.png"}  # error lines and the cut line do not count
    assert read_done(tmp_path / "missing.jsonl") == set()


def test_color_order_for_arrays():
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 200  # red
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    assert np.array_equal(load_image(bgr, color_order="bgr"), rgb)
    assert np.array_equal(load_image(rgb), rgb)
    assert np.array_equal(load_image(bgr, color_order="BGR"), rgb)
    with pytest.raises(RequestError, match="color_order"):
        load_image(rgb, color_order="rbg")


def test_change_measure_identical_noise_pan_cut():
    """0 for identical frames, tiny for sensor-like noise, small for a slow pan, close to 1 for a cut; a fade
    (brightness only) counts too."""
    path = "tests/fixtures/photos/chelsea.jpg"
    photo = load_image(path)
    other = load_image("tests/fixtures/photos/rocket.jpg")
    h, w = 240, 320
    a = np.ascontiguousarray(photo[:h, :w])
    assert frame_change(a, a.copy()) == 0.0
    rng = np.random.default_rng(0)
    noisy = np.clip(a.astype(np.int16) + rng.integers(-3, 4, a.shape), 0, 255).astype(np.uint8)
    assert frame_change(a, noisy) < 0.005
    pan = np.ascontiguousarray(photo[:h, 2 : w + 2])  # 2 px of 320
    assert 0 < frame_change(a, pan) < 0.05
    cut = np.ascontiguousarray(other[:h, :w])
    assert frame_change(a, cut) > 0.5
    fade = (a * 0.5).astype(np.uint8)
    assert frame_change(a, fade) > 0.3
    flat = np.full((h, w, 3), 128, np.uint8)
    assert frame_change(flat, flat.copy()) == 0.0 and frame_change(flat, a) > 0.9
    tiny = np.ascontiguousarray(a[:7, :5])  # smaller than the thumbnail
    assert thumbnail(tiny).shape == (32, 32, 3) and frame_change(tiny, tiny) == 0.0


def test_sampler_every_and_fps():
    s = _Sampler(3, None)
    assert [i for i in range(10) if s(Frame(i, None, None))] == [0, 3, 6, 9]
    s = _Sampler(None, 4.0)  # 4 per second of a 10 fps stream
    assert [i for i in range(20) if s(Frame(i, i / 10, None))] == [0, 3, 5, 8, 10, 13, 15, 18]
    s = _Sampler(None, 1.0)
    with pytest.raises(RequestError, match="no stream time"):
        s(Frame(0, None, None))


def test_frame_directory_and_iterable_sources(tmp_path):
    for i in range(3):
        _pic(tmp_path / "frames" / f"f{i:03d}.png", seed=i)
    src = open_source(tmp_path / "frames")
    frames = list(src)
    assert [f.index for f in frames] == [0, 1, 2] and frames[0].time_s is None
    assert np.array_equal(frames[1].rgb, load_image(tmp_path / "frames" / "f001.png"))
    bgr = np.ascontiguousarray(frames[0].rgb[:, :, ::-1])
    out = list(open_source([(0.5, bgr)], color_order="bgr"))
    assert out[0].time_s == 0.5 and np.array_equal(out[0].rgb, frames[0].rgb)
    with pytest.raises(RequestError):
        open_source(b"bytes are not a stream")
    with pytest.raises(LegionError, match="no such"):
        open_source(tmp_path / "missing.mp4")


def test_missing_video_extra_is_one_line(tmp_path, monkeypatch):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00" * 100)
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 -> ImportError
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(LegionError) as e:
        open_source(clip)
    msg = str(e.value)
    assert "pip install 'legion_rt[video]'" in msg and "\n" not in msg and "clip.mp4" in msg
