"""``legion-rt`` command line: exit status (0 / 2 usage / 1 failure), one clear stderr line and no traceback on bad
input, JSON / overlay / mask files written, and no partial file left behind on failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "legion_rt" / "assets" / "demo.jpg"


def _cli(*args, env=None, timeout=300):
    """Run ``python -m legion_rt`` in a subprocess (what a user runs), from the source tree."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("LEGION_RT_DEBUG", None)
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "legion_rt", *map(str, args)],
        capture_output=True,
        text=True,
        env=e,
        timeout=timeout,
        cwd=REPO,
    )


def _one_error_line(proc, pattern: str):
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("legion-rt: error:")]
    assert len(lines) == 1, proc.stderr
    assert pattern in lines[0], lines[0]


def test_usage_errors_exit_2():
    assert _cli().returncode == 2
    assert _cli("analyze").returncode == 2  # IMAGE and --artifacts missing
    p = _cli("analyze", DEMO, "--artifacts", "x", "--max-new-tokens", "0")
    assert p.returncode == 2 and "--max-new-tokens" in p.stderr and "Traceback" not in p.stderr
    p = _cli("analyze", DEMO, "--artifacts", "x", "--skip-if-real", "1.5")
    assert p.returncode == 2 and "1.5" in p.stderr
    p = _cli("analyze", DEMO, "--artifacts", "x", "--backend", "magic")
    assert p.returncode == 2
    assert _cli("--version").returncode == 0
    assert _cli("analyze", "--help").returncode == 0


def test_bad_files_exit_1_one_line(tmp_path):
    p = _cli("analyze", tmp_path / "missing.jpg", "--artifacts", tmp_path)
    assert p.returncode == 1
    _one_error_line(p, "missing.jpg")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG not really")
    p = _cli("analyze", junk, "--artifacts", tmp_path, "--json", tmp_path / "out.json")
    assert p.returncode == 1
    _one_error_line(p, "junk.png")
    assert not (tmp_path / "out.json").exists()
    p = _cli("analyze", DEMO, "--artifacts", tmp_path / "no-art")
    assert p.returncode == 1
    _one_error_line(p, "no-art")
    p = _cli("build-engines", tmp_path / "no-art")
    assert p.returncode == 1
    _one_error_line(p, "no-art")


def test_export_without_torch_is_a_clear_error(tmp_path):
    # A meta-path finder hides torch: the export-stage commands must say what to install.
    stub = tmp_path / "sitecustomize.py"
    stub.write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ImportError('blocked: ' + name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    p = _cli("make-tiny", "--out", tmp_path / "t", env=env)
    assert p.returncode == 1
    _one_error_line(p, "export")
    assert not (tmp_path / "t").exists()


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    from legion_rt.overlay import atomic_write_bytes, atomic_write_json

    target = tmp_path / "out.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"a": object()})  # not serializable: fails before anything is written
    assert json.loads(target.read_text()) == {"a": 1}

    def failing_write(*_a, **_k):
        raise OSError("disk full")

    import legion_rt.overlay as ov

    real = ov.os.fsync
    ov.os.fsync = failing_write
    try:
        with pytest.raises(OSError, match="disk full"):
            atomic_write_bytes(tmp_path / "x.png", b"data")
    finally:
        ov.os.fsync = real
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temp file, no x.png


@pytest.mark.slow
def test_analyze_writes_json_overlay_masks(tmp_path, tiny_artifacts):
    picture = tmp_path / "pic.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((61, 83, 3)) * 255).astype(np.uint8)).save(picture)
    p = _cli(
        "analyze",
        picture,
        "--artifacts",
        tiny_artifacts,
        "--json",
        tmp_path / "out" / "r.json",
        "--overlay",
        tmp_path / "out" / "o.png",
        "--masks-dir",
        tmp_path / "out" / "masks",
        "--max-new-tokens",
        "24",
        "--threads",
        "1",
    )
    assert p.returncode == 0, p.stderr
    doc = json.loads((tmp_path / "out" / "r.json").read_text())
    assert doc["image"] == str(picture)
    assert len(doc["token_ids"]) >= 1 and doc["verdict"] in ("fake", "real")
    assert set(doc["timings"]) >= {
        "preprocess",
        "vision",
        "sam_encoder",
        "prefill",
        "decode",
        "masks",
        "total",
    }
    with Image.open(tmp_path / "out" / "o.png") as im:
        assert im.size == (83, 61) and im.mode == "RGB"
    masks = sorted((tmp_path / "out" / "masks").iterdir())
    assert masks[-1].name == "pic_union.png" and len(masks) == 1 + len(doc["artifacts"])
    # streamed text reached stdout
    from legion_rt.engine import Engine

    res = Engine(tiny_artifacts, threads=1).analyze(picture, max_new_tokens=24)
    assert res.token_ids == doc["token_ids"]
    streamed = p.stdout.strip()
    assert streamed, "no streamed text on stdout"
    # bad --max-new-tokens beyond the model's positions: a request error (exit 2), nothing written
    p = _cli(
        "analyze",
        picture,
        "--artifacts",
        tiny_artifacts,
        "--max-new-tokens",
        "100000",
        "--json",
        tmp_path / "bad.json",
    )
    assert p.returncode == 2
    _one_error_line(p, "max_new_tokens")
    assert not (tmp_path / "bad.json").exists()


def test_eval_metrics_by_hand():
    from legion_rt.evaluate import metrics

    gt = np.zeros((4, 5), bool)
    gt[1:3, 1:4] = True  # 6 px
    pred = np.zeros((4, 5), bool)
    pred[1:3, 2:5] = True  # 6 px, 4 overlap
    m = metrics(pred, gt)
    assert abs(m["iou_fg"] - 4 / 8) < 1e-6 and abs(m["iou_bg"] - 12 / 16) < 1e-6
    assert abs(m["miou"] - (0.5 + 0.75) / 2) < 1e-6
    assert abs(m["f1"] - 2 * 4 / (2 * 4 + 2 + 2)) < 1e-12
    empty = np.zeros((4, 5), bool)
    assert metrics(empty, empty)["f1"] == 1.0
    assert metrics(pred, empty)["f1"] == 0.0


@pytest.mark.slow
def test_eval_command(tmp_path, tiny_artifacts):
    cv2 = pytest.importorskip("cv2", reason="eval rasterizes polygons with OpenCV")
    ds = tmp_path / "ds"
    (ds / "test" / "images").mkdir(parents=True)
    (ds / "test" / "annoations").mkdir(parents=True)
    rng = np.random.default_rng(3)
    entries = []
    for i, (h, w) in enumerate([(40, 60), (53, 41)]):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(
            ds / "test" / "images" / f"im{i}.png"
        )
        poly = [3.7, 2.2, w - 5.5, 4.9, w / 2, h - 3.1]
        entries.append({str(i): {"caption": "", "img_file_name": f"x/im{i}.png",
                                 "refs": [{"sentence": "", "explanation": "", "bbox": None, "segmentation": [poly]}]}})  # fmt: skip
    (ds / "test" / "annoations" / "object.json").write_text(json.dumps(entries))
    p = _cli("eval", "--artifacts", tiny_artifacts, "--dataset", ds, "--max-new-tokens", "16",
             "--json", tmp_path / "ev.json", "--threads", "1")  # fmt: skip
    assert p.returncode == 0, p.stderr
    rep = json.loads((tmp_path / "ev.json").read_text())
    assert rep["overall"]["images"] == 2 and set(rep["per_type"]) == {"all"}
    # independent recomputation: the engine's union mask vs cv2.fillPoly of the int-truncated polygon
    from legion_rt.engine import Engine

    eng = Engine(tiny_artifacts, threads=1)
    vals = []
    for i, e in enumerate(entries):
        seg = e[str(i)]["refs"][0]["segmentation"][0]
        res = eng.analyze(ds / "test" / "images" / f"im{i}.png", max_new_tokens=16)
        gt = np.zeros(res.mask.shape, np.uint8)
        cv2.fillPoly(gt, [np.asarray(seg, np.float32).reshape(-1, 2).astype(np.int32)], 1)
        gt = gt.astype(bool)
        tp = (res.mask & gt).sum()
        fp = (res.mask & ~gt).sum()
        fn = (~res.mask & gt).sum()
        tn = gt.size - tp - fp - fn
        vals.append((tp / (tp + fp + fn + 1e-6) + tn / (tn + fp + fn + 1e-6)) / 2)
    assert abs(rep["overall"]["miou"] - float(np.mean(vals))) < 1e-12
    p = _cli("eval", "--artifacts", tiny_artifacts, "--dataset", tmp_path / "nothing")
    assert p.returncode == 1
    _one_error_line(p, "nothing")


def test_build_engines_without_tensorrt(tiny_artifacts):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: the error path is not reachable")
    p = _cli("build-engines", tiny_artifacts, "--verify", "size")
    assert p.returncode == 1
    _one_error_line(p, "TensorRT is not installed")
    p = _cli("analyze", DEMO, "--artifacts", tiny_artifacts, "--backend", "tensorrt", "--verify", "size")
    assert p.returncode == 1
    _one_error_line(p, "TensorRT is not installed")


def test_make_tiny_steer_option(tmp_path):
    pytest.importorskip("torch", reason="make-tiny needs the export extra (torch)")
    p = _cli("make-tiny", "--out", tmp_path / "free", "--seed", "3", "--steer", "free")
    assert p.returncode == 0, p.stderr
    info = json.loads((tmp_path / "free" / "tiny_info.json").read_text())
    assert info["steer"] == "free"
    bad = _cli("make-tiny", "--out", tmp_path / "x", "--steer", "sideways")
    assert bad.returncode == 2 and "--steer" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_make_tiny_full_plants_the_loop_only(tmp_path):
    """make-tiny --size full --steer free is refused in one line (the free language needs a forward pass of the
    whole 7B); the disk check before anything is written: tests/test_full_size_writer.py."""
    pytest.importorskip("torch", reason="make-tiny needs the export extra (torch)")
    bad = _cli("make-tiny", "--size", "full", "--steer", "free", "--out", tmp_path / "f")
    assert bad.returncode != 0
    _one_error_line(bad, "loop language only")
    assert not (tmp_path / "f").exists()
