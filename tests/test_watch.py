"""``Engine.watch`` / ``legion-rt watch`` on clips encoded here (OpenCV's VideoWriter, MJPEG in AVI): static
stretches with a little noise and hard cuts. Analyzed frames give exactly ``analyze``'s result on the same decoded
frame (OpenCV and PyAV decoding), unchanged and dropped frames are reported as such, a live source faster than
the analysis keeps a bounded number of frames alive, the CLI writes a JSON line per frame as it goes and Ctrl-C
leaves them intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import weakref

import numpy as np
import pytest

from legion_rt.errors import RequestError
from legion_rt.image import load_image

cv2 = pytest.importorskip("cv2", reason="the clips are encoded with OpenCV (test extra)")

PHOTOS = [
    "tests/fixtures/photos/chelsea.jpg",
    "tests/fixtures/photos/coffee.jpg",
    "tests/fixtures/photos/rocket.jpg",
]
W, H, FPS, RUN = 64, 48, 10.0, 6  # 3 scenes x 6 frames at 10 fps
TOKENS = 8  # the tiny loop model emits its first [SEG] within 8 tokens: masks are compared too


def _scenes():
    out = []
    for p in PHOTOS:
        rgb = load_image(p)
        out.append(np.ascontiguousarray(cv2.resize(rgb, (W, H), interpolation=cv2.INTER_AREA)))
    return out


def _write_clip(path, scenes, run=RUN, noise=2, seed=0):
    """Each scene for ``run`` frames (small noise per frame, as a camera's), then a hard cut to the next."""
    rng = np.random.default_rng(seed)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (W, H))
    assert vw.isOpened(), "OpenCV cannot write MJPEG AVI here"
    for s in scenes:
        for _ in range(run):
            f = np.clip(s.astype(np.int16) + rng.integers(-noise, noise + 1, s.shape), 0, 255).astype(
                np.uint8
            )
            vw.write(np.ascontiguousarray(f[:, :, ::-1]))
    vw.release()
    return path


def _decode_cv2(path):
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(bgr)
    cap.release()
    return frames


def _same(a, b):
    assert a.verdict == b.verdict and a.label == b.label
    assert a.fake_probability == b.fake_probability and a.cls_logits == b.cls_logits
    assert a.token_ids == b.token_ids and a.text == b.text
    assert len(a.artifacts) == len(b.artifacts)
    for x, y in zip(a.artifacts, b.artifacts, strict=True):
        assert np.array_equal(x.mask, y.mask) and x.bbox == y.bbox
    assert np.array_equal(a.mask, b.mask) and a.image_size == b.image_size


@pytest.fixture(scope="module")
def engine(tiny_artifacts):
    from legion_rt import Engine

    eng = Engine(tiny_artifacts, threads=1, verify="size")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return _write_clip(tmp_path_factory.mktemp("clip") / "clip.avi", _scenes())


def test_video_static_stretches_and_cuts_match_analyze(engine, clip):
    """min_change 0.05: one analyzed frame per scene (the cuts), the rest unchanged and pointing at it; each
    analyzed frame's result is analyze() of the same frame decoded by OpenCV (BGR, color_order="bgr")."""
    got = list(engine.watch(str(clip), min_change=0.05, max_new_tokens=TOKENS))
    assert [f.index for f in got] == list(range(3 * RUN))
    assert [f.status for f in got] == (["analyzed"] + ["unchanged"] * (RUN - 1)) * 3
    for f in got:
        scene_start = f.index // RUN * RUN
        assert f.time_s == pytest.approx(f.index / FPS)
        if f.status == "unchanged":
            assert f.same_as == scene_start and f.change < 0.05 and f.result is got[scene_start].result
        elif f.index:
            assert f.change > 0.5  # a cut
    decoded = _decode_cv2(clip)
    assert len(decoded) == 3 * RUN
    masks = 0
    for f in got:
        if f.status == "analyzed":
            want = engine.analyze(decoded[f.index], color_order="bgr", max_new_tokens=TOKENS)
            _same(f.result, want)
            masks += len(want.artifacts)
    assert masks > 0, "the comparison should include masks"
    # without min_change every frame is analyzed; every=N and fps=F sample by index and by stream time
    assert [f.index for f in engine.watch(str(clip), every=5, max_new_tokens=1)] == [0, 5, 10, 15]
    by_time = list(engine.watch(str(clip), fps=4, max_new_tokens=1, limit_frames=11))
    assert [f.index for f in by_time] == [0, 3, 5, 8, 10]
    assert {f.status for f in by_time} == {"analyzed"}


def test_pyav_decoding_matches_analyze(engine, clip):
    av = pytest.importorskip("av", reason="PyAV (video extra)")
    with av.open(str(clip)) as c:
        frames = [fr.to_ndarray(format="rgb24") for fr in c.decode(video=0)]
    got = list(engine.watch(str(clip), decoder="pyav", every=RUN, max_new_tokens=2))
    assert [f.index for f in got] == [0, RUN, 2 * RUN]
    assert [f.time_s for f in got] == pytest.approx([0.0, RUN / FPS, 2 * RUN / FPS])
    for f in got:
        _same(f.result, engine.analyze(frames[f.index], max_new_tokens=2))


def test_iterable_bgr_and_frame_directory(engine, tmp_path):
    scenes = _scenes()
    bgr = [np.ascontiguousarray(s[:, :, ::-1]) for s in scenes]
    got = list(engine.watch(bgr, color_order="bgr", max_new_tokens=2))
    assert [f.status for f in got] == ["analyzed"] * 3 and got[0].time_s is None
    for f, s in zip(got, scenes, strict=True):
        _same(f.result, engine.analyze(s, max_new_tokens=2))
    swapped = engine.analyze(
        bgr[0], max_new_tokens=2
    )  # the same array taken as RGB: other colours, other logits
    assert swapped.cls_logits != got[0].result.cls_logits
    from PIL import Image

    for i, s in enumerate(scenes + [scenes[2]]):
        Image.fromarray(s).save(tmp_path / f"frame{i:03d}.png")
    got = list(engine.watch(str(tmp_path), min_change=0.01, max_new_tokens=2))
    assert [(f.status, f.same_as) for f in got] == [("analyzed", None)] * 3 + [("unchanged", 2)]
    assert got[3].change == 0.0
    with pytest.raises(RequestError, match="no stream time"):
        list(engine.watch(str(tmp_path), fps=1.0, max_new_tokens=2))


def test_bad_arguments_raise_at_the_call(engine, clip):
    for kw in (
        {"every": 0},
        {"every": 2, "fps": 1.0},
        {"fps": -1.0},
        {"min_change": 1.5},
        {"color_order": "x"},
    ):
        with pytest.raises(RequestError):
            engine.watch(str(clip), **kw)


def test_live_source_faster_than_analysis_drops_and_stays_bounded(engine):
    """A live source at ~500 frames/s against an analysis of ~0.2 s per frame: the newest frame wins, every
    frame is reported once, in order (analyzed or dropped), and at most a handful of frames are
    alive at any time however many the source produces."""
    scenes = _scenes()
    big = [np.ascontiguousarray(cv2.resize(s, (320, 240))) for s in scenes]
    n = 300
    alive: list[weakref.ref] = []
    most = 0

    def camera():
        nonlocal most
        for i in range(n):
            frame = big[min(2, i * 3 // n)].copy()  # a fresh array per frame, as a camera delivers
            alive.append(weakref.ref(frame))
            most = max(most, sum(r() is not None for r in alive[-50:]))
            yield frame
            time.sleep(0.002)

    got = list(engine.watch(camera(), live=True, max_new_tokens=2))
    assert [f.index for f in got] == list(range(n))
    statuses = [f.status for f in got]
    assert statuses.count("dropped") > n // 2, statuses.count("dropped")
    assert statuses.count("analyzed") >= 1
    assert got[-1].status != "dropped"  # the last frame is analyzed (or unchanged), never left behind
    assert all(f.result is None and f.same_as is None for f in got if f.status == "dropped")
    assert all(f.time_s is not None for f in got)
    # the frame being produced, the newest waiting one, the one in analysis (and the request still holding it
    # until it is collected): a constant, whatever n is
    assert most <= 6, f"{most} frames alive at once"


def _cli(*args):
    return [sys.executable, "-m", "legion_rt", "watch", *map(str, args)]


def test_cli_watch_jsonl(tiny_artifacts, clip, tmp_path):
    out = tmp_path / "w.jsonl"
    p = subprocess.run(
        _cli(clip, "--artifacts", tiny_artifacts, "--every", "2", "--min-change", "0.05")
        + ["--jsonl", str(out), "--limit-frames", "13", "--max-new-tokens", "2", "--threads", "1"]
        + ["--video-out", str(tmp_path / "ann.avi")]
        + ["--verify", "size"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [d["frame"] for d in docs] == [0, 2, 4, 6, 8, 10, 12]
    assert [d["status"] for d in docs] == ["analyzed", "unchanged", "unchanged", "analyzed"] + [
        "unchanged"
    ] * 2 + ["analyzed"]
    for d in docs:
        assert {"frame", "time_s", "status", "same_as"} <= set(d)
        if d["status"] == "analyzed":
            assert d["verdict"] in ("fake", "real") and len(d["token_ids"]) == 2 and d["same_as"] is None
        else:
            assert d["same_as"] in (0, 6) and "token_ids" not in d
    assert docs[1]["time_s"] == pytest.approx(0.2)
    assert "3 analyzed, 4 unchanged, 0 dropped" in p.stderr
    annotated = _decode_cv2(tmp_path / "ann.avi")  # every considered frame, drawn
    assert len(annotated) == 7 and annotated[0].shape == (H, W, 3)
    # to stdout
    p = subprocess.run(
        _cli(
            clip,
            "--artifacts",
            tiny_artifacts,
            "--jsonl",
            "-",
            "--limit-frames",
            "1",
            "--max-new-tokens",
            "1",
        )
        + ["--quiet", "--verify", "size"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    assert [json.loads(line)["frame"] for line in p.stdout.splitlines()] == [0]


def test_cli_watch_ctrl_c_keeps_the_lines(tiny_artifacts, tmp_path):
    """SIGINT in the middle of a long clip: exit 130, one line 'interrupted', every line written is whole."""
    scenes = _scenes()
    long_clip = _write_clip(tmp_path / "long.avi", scenes * 10, run=8)  # 240 frames, all analyzed
    out = tmp_path / "w.jsonl"
    proc = subprocess.Popen(
        _cli(long_clip, "--artifacts", tiny_artifacts, "--jsonl", out, "--max-new-tokens", "1")
        + ["--threads", "1", "--verify", "size", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as in a terminal: a suite started in the background (`nohup ... &`) hands its children SIGINT ignored,
        # and Python then never installs its KeyboardInterrupt handler (the CLI would run to the end, exit 0)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
        time.sleep(0.05)
    assert out.exists(), "no line was written"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["legion-rt: error: interrupted"]
    text = out.read_text()
    assert text.endswith("\n")
    frames = [json.loads(line)["frame"] for line in text.splitlines()]
    assert frames == list(range(len(frames))) and 3 <= len(frames) < 240
    assert os.path.getsize(out) == len(text.encode())


def test_url_source_is_live(engine, clip):
    """An http:// URL (the clip served from this process) is read as a live source: OpenCV pulls frames as fast
    as they come, so while a frame is analyzed the next ones are dropped; every frame is still reported once."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(clip.parent))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{clip.name}"
        try:
            frames = engine.watch(url, max_new_tokens=4)
        except Exception as e:  # an OpenCV build without network support
            pytest.skip(f"OpenCV cannot open an http URL here: {e}")
        got = list(frames)
    finally:
        server.shutdown()
    assert [f.index for f in got] == list(range(3 * RUN))
    assert got[-1].status == "analyzed"  # the newest frame is never left behind
    assert "dropped" in {f.status for f in got}
