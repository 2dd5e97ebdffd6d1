"""``Engine.classify`` / ``legion-rt classify``: batched verdicts equal ``analyze``'s, batch 8 against batch 1
within the stated tolerance, BGR arrays, JSON Lines output."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from legion_rt.errors import ImageError, RequestError

# Batched vs batch-1 ONNX Runtime logits: the same graph, but the batched matrix products may sum in another order.
# Measured on the tiny model (CPU): max |difference| 0 .. 5e-7 on logits, P(fake) within 1e-6.
LOGIT_TOL = 1e-5


@pytest.fixture(scope="module")
def engine(tiny_artifacts):
    from legion_rt import Engine

    eng = Engine(tiny_artifacts, threads=1)
    yield eng
    eng.close()


def _pictures(tmp_path, n=11):
    rng = np.random.default_rng(5)
    out = []
    for i in range(n):
        h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        base = rng.random((1, 1, 3)) * 255  # pictures differ in colour, so the detector's answers differ
        arr = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        p = tmp_path / f"p{i:02d}.png"
        Image.fromarray(arr).save(p)
        out.append(p)
    return out


def test_classify_equals_analyze_and_batch_one(engine, tmp_path):
    """Verdicts, labels identical to analyze's; probabilities within LOGIT_TOL; batch 8 (with a short last
    batch) against batch 1 likewise; paths, arrays and BGR arrays agree."""
    pics = _pictures(tmp_path)
    b8 = engine.classify([str(p) for p in pics], batch_size=8)
    b1 = engine.classify([str(p) for p in pics], batch_size=1)
    assert len(b8) == len(b1) == len(pics)
    probs = set()
    for p, c8, c1 in zip(pics, b8, b1, strict=True):
        r = engine.analyze(str(p), max_new_tokens=1)
        assert c8.image == str(p)
        assert c8.verdict == c1.verdict == r.verdict
        assert c8.label == c1.label == r.label
        assert abs(c1.fake_probability - r.fake_probability) <= LOGIT_TOL
        assert abs(c8.fake_probability - c1.fake_probability) <= LOGIT_TOL
        assert np.max(np.abs(np.subtract(c8.cls_logits, c1.cls_logits))) <= LOGIT_TOL
        probs.add(round(c1.fake_probability, 6))
    assert len(probs) > 1, "the pictures should not all get the same probability"
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in pics[:3]]
    bgr = [np.ascontiguousarray(a[:, :, ::-1]) for a in arrays]
    from_bgr = engine.classify(bgr, batch_size=2, color_order="bgr")
    from_rgb = engine.classify(arrays, batch_size=2)
    assert [c.cls_logits for c in from_bgr] == [c.cls_logits for c in from_rgb]
    assert [c.verdict for c in from_rgb] == [c.verdict for c in b8[:3]]
    assert from_rgb[0].image is None
    swapped = engine.classify(bgr, batch_size=2)  # BGR taken as RGB: other pixels, other logits
    assert [c.cls_logits for c in swapped] != [c.cls_logits for c in from_rgb]
    assert engine.classify(str(pics[0]))[0].cls_logits == b1[0].cls_logits  # one path, not its characters


def test_classify_bad_arguments(engine, tmp_path):
    with pytest.raises(RequestError, match="batch_size"):
        engine.classify([], batch_size=0)
    with pytest.raises(RequestError, match="color_order"):
        engine.classify([], color_order="xyz")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    with pytest.raises(ImageError, match="bad.png"):
        engine.classify([str(bad)])
    assert engine.classify([]) == []


def test_cli_classify_jsonl_keep_going(engine, tiny_artifacts, tmp_path):
    pics = _pictures(tmp_path, n=5)
    (tmp_path / "zz_bad.png").write_bytes(b"nope")
    out = tmp_path / "c.jsonl"
    cmd = [sys.executable, "-m", "legion_rt", "classify", str(tmp_path), "--artifacts", str(tiny_artifacts)]
    p = subprocess.run(
        [*cmd, "--batch-size", "3", "--jsonl", str(out), "--threads", "1", "--verify", "size"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 1 and "zz_bad.png" in p.stderr and "Traceback" not in p.stderr  # no --keep-going
    assert not out.exists() or out.read_text() == ""
    p = subprocess.run(
        [
            *cmd,
            "--batch-size",
            "3",
            "--jsonl",
            str(out),
            "--keep-going",
            "--threads",
            "1",
            "--verify",
            "size",
        ],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 1, p.stderr
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    errs = [d for d in docs if "error" in d]
    oks = {d["image"]: d for d in docs if "error" not in d}
    assert [d["image"] for d in errs] == [str(tmp_path / "zz_bad.png")]
    assert sorted(oks) == sorted(str(p) for p in pics)
    want = engine.classify([str(p) for p in pics], batch_size=1)
    for c in want:
        assert oks[c.image]["verdict"] == c.verdict and oks[c.image]["label"] == c.label
        assert abs(oks[c.image]["fake_probability"] - c.fake_probability) <= LOGIT_TOL
    # without --jsonl: one tab-separated line per picture on stdout
    one = [sys.executable, "-m", "legion_rt", "classify", str(pics[0]), "--artifacts", str(tiny_artifacts)]
    p = subprocess.run([*one, "--threads", "1"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    name, verdict, prob = p.stdout.strip().split("\t")
    assert name == str(pics[0]) and verdict == want[0].verdict
