"""Acceptance: the product end to end through its public surfaces, against the reference, like an outside checker.

Fresh random models made and exported by the command line (`legion-rt make-tiny`, `legion-rt export`):
  - "loop23": make-tiny --seed 23 (the default steered model: a planted token cycle, same text for every picture,
    so only masks and the detector see the picture);
  - "free11": make_tiny(seed=11, steer="free") (a random LLM whose greedy text depends on the picture: token identity
    checks the whole image path: decoding, CLIP preprocessing, vision graph, prefill).
Pictures: degenerate and odd sizes (1x1, 1xW, Hx1, 7x3, 333x1001, 2001x17), grayscale, RGBA, 16-bit PNG, EXIF-rotated
JPEG, a 3000x4000 JPEG (slow), and real photographs (tests/fixtures/photos, public domain / CC0, see LICENSE.md).
Compared with export.reference.ReferencePipeline (PyTorch fp32; KV-cached, and once the original's no-cache loop):
token ids, text, explanation, phrases, per-mask phrases, per-mask IoU, union mask, bbox/area vs mask,
fake_probability, verdict; and `legion-rt analyze --json --overlay` output files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from legion_rt import ImageError
from legion_rt.engine import Engine

torch = pytest.importorskip("torch", reason="the reference pipeline (export stage) needs torch")

PHOTOS = Path(__file__).parent / "fixtures" / "photos"
MAX_NEW = 40  # the free model ends with EOS around token 30-55: some runs stop, some hit the limit
# Mask IoU bound from the issue. Measured minimum over every mask here (113-144 masks, 2 cores): 0.99995 (MEASURED,
# printed at the end of the module).
IOU_MIN = 0.99
# Detector probability, ONNX Runtime vs PyTorch fp32 (bound from the issue); measured max |diff| 7.4e-8.
PROB_TOL = 1e-4
MEASURED = {"min_iou": 1.0, "max_prob_err": 0.0, "masks": 0, "pictures": 0, "min_margin": float("inf")}
REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "legion_rt", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}"
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"loop23": (engine, reference), "free11": (...)}, made and exported through the command line."""
    from legion_rt.export.reference import ReferencePipeline
    from legion_rt.export.tiny import make_tiny

    root = tmp_path_factory.mktemp("acceptance")
    loop, free = root / "loop23", root / "free11"
    _ok(_cli("make-tiny", "--out", str(loop), "--seed", "23"))
    # `legion-rt make-tiny` has no --steer flag yet: the free model is made through the Python API.
    make_tiny(free, seed=11, steer="free")
    exports = []
    for d in (loop, free):  # both exports at once (2 cores)
        cmd = ["export", "--checkpoint", str(d / "checkpoint"), "--clip", str(d / "clip"),
               "--detector", str(d / "detector.bin"), "--out", str(d / "art"), "--quiet"]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        exports.append(
            subprocess.Popen(
                [sys.executable, "-m", "legion_rt", *cmd],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for p in exports:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"legion-rt export failed: {err[-2000:]}"
    torch.set_num_threads(1)
    made = {}
    for name, d in (("loop23", loop), ("free11", free)):
        ref = ReferencePipeline.from_checkpoint(d / "checkpoint", d / "clip", d / "detector.bin")
        made[name] = (Engine(d / "art", backend="onnxruntime", threads=1), ref, d / "art")
    yield made
    for eng, _, _ in made.values():
        eng.close()
    print(
        f"\nacceptance measured: {MEASURED['pictures']} picture runs, {MEASURED['masks']} masks, min mask IoU "
        f"{MEASURED['min_iou']:.6f}, max |fake_probability diff| {MEASURED['max_prob_err']:.2e}, smallest top-2 "
        f"margin on the free model's greedy path {MEASURED['min_margin']:.4f}"
    )


def _smooth(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth colour picture with noise (uint8 [h, w, 3]): different seeds give different pictures."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    f = rng.uniform(0.005, 0.05, 6)
    chans = [128 + 100 * np.sin(x * f[2 * k] + k) * np.cos(y * f[2 * k + 1] + seed) for k in range(3)]
    img = np.stack(chans, 2) + rng.normal(0, 8, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """name -> path. Odd sizes, formats and real photos."""
    import cv2

    d = tmp_path_factory.mktemp("pictures")
    out = {}
    for i, (h, w) in enumerate([(1, 1), (1, 257), (193, 1), (7, 3), (333, 1001), (2001, 17)]):
        p = d / f"size_{h}x{w}.png"
        Image.fromarray(_smooth(h, w, 100 + i)).save(p)
        out[f"{h}x{w}"] = p
    p = d / "gray.png"
    Image.fromarray(_smooth(181, 263, 7)[:, :, 1]).save(p)
    out["gray"] = p
    p = d / "rgba.png"
    rgb = _smooth(150, 211, 8)
    Image.fromarray(
        np.dstack([rgb, (np.arange(211) % 256).astype(np.uint8)[None].repeat(150, 0)]), "RGBA"
    ).save(p)
    out["rgba"] = p
    p = d / "rgb16.png"  # 16-bit RGB: the reference keeps the high byte; low bytes are noise
    hi = _smooth(120, 170, 9).astype(np.uint16)
    lo = np.random.default_rng(9).integers(0, 256, hi.shape).astype(np.uint16)
    assert cv2.imwrite(str(p), ((hi << 8) | lo)[:, :, ::-1])  # OpenCV writes BGR
    out["rgb16"] = p
    p = d / "rotated6.jpg"
    ex = Image.Exif()
    ex[0x0112] = 6
    Image.fromarray(_smooth(140, 230, 10)).save(p, exif=ex, quality=92)
    out["rotated6"] = p
    p = d / "rotated8.jpg"
    ex[0x0112] = 8
    Image.open(PHOTOS / "chelsea.jpg").save(p, exif=ex, quality=90)
    out["rotated8_photo"] = p
    for f in sorted(PHOTOS.iterdir()):
        if f.suffix in (".jpg", ".png"):
            out[f"photo_{f.stem}"] = f
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@torch.no_grad()
def _reference_margins(ref, image, tokens: list[int]) -> list[float]:
    """Top-2 logit margins of the reference (KV-cached) along ``tokens`` (teacher-forced): margins[i] is the gap
    between the best and second-best logits at the step that chose tokens[i]."""
    pre = ref.preprocess(ref.load_image(image))
    state, logits, _ = ref.prefill(ref.vision(pre.clip_pixels).image_embeds)
    margins = []
    for t in tokens:
        top = logits.topk(2).values
        margins.append(float(top[0] - top[1]))
        logits, _ = ref.decode_step(state, t)
    return margins


def _check_tokens(got: list[int], want: list[int], ref, image, name: str) -> None:
    if got == want:
        return
    i = next((k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
    margins = _reference_margins(ref, image, want[: i + 1])
    margin = margins[i] if i < len(margins) else float("nan")
    pytest.fail(
        f"{name}: token ids differ first at generated token {i}: product {got[i : i + 3]} vs reference "
        f"{want[i : i + 3]}; the reference's top-2 logit margin at that step is {margin:.3g} "
        f"(lengths {len(got)} vs {len(want)})"
    )


def _compare(res, ref_out, ref, image, name: str) -> None:
    """Everything the Result must share with the reference."""
    _check_tokens(res.token_ids, ref_out.token_ids, ref, image, name)
    assert res.text == ref_out.text, name
    assert res.explanation == ref_out.explanation, name
    assert res.phrases == list(ref_out.phrases), name
    assert [a.phrase for a in res.artifacts] == list(ref_out.mask_phrases), name
    assert res.image_size == ref_out.original_size, name
    assert res.mask.shape == ref_out.original_size and res.mask.dtype == bool, name
    assert len(res.artifacts) == ref_out.masks.shape[0], name
    for i, a in enumerate(res.artifacts):
        assert a.mask.shape == ref_out.original_size and a.mask.dtype == bool, name
        iou = _iou(a.mask, ref_out.masks[i])
        MEASURED["min_iou"] = min(MEASURED["min_iou"], iou)
        MEASURED["masks"] += 1
        assert iou >= IOU_MIN, f"{name}: mask {i} IoU {iou:.5f}"
        assert a.index == i and res.token_ids[a.token_index] == ref.seg_id, name
        ys, xs = np.nonzero(a.mask)
        assert a.area == len(ys), name
        want_box = (0, 0, 0, 0) if not len(ys) else (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert tuple(a.bbox) == tuple(int(v) for v in want_box), (
            f"{name}: mask {i} bbox {a.bbox} vs {want_box}"
        )
    union = (
        np.logical_or.reduce([a.mask for a in res.artifacts]) if res.artifacts else np.zeros_like(res.mask)
    )
    assert np.array_equal(res.mask, union), f"{name}: Result.mask is not the union of the artifact masks"
    iou = _iou(res.mask, ref_out.mask)
    MEASURED["min_iou"] = min(MEASURED["min_iou"], iou)
    assert iou >= IOU_MIN, f"{name}: union mask IoU {iou:.5f}"
    assert ref_out.fake_probability is not None and res.fake_probability is not None, name
    err = abs(res.fake_probability - ref_out.fake_probability)
    MEASURED["max_prob_err"] = max(MEASURED["max_prob_err"], err)
    assert err <= PROB_TOL, f"{name}: fake_probability {res.fake_probability} vs {ref_out.fake_probability}"
    assert res.verdict == ref_out.verdict, name
    MEASURED["pictures"] += 1


def _run_both(models, which: str, image, name: str, max_new: int = MAX_NEW):
    eng, ref, _ = models[which]
    ref_out = ref.run(image, max_new_tokens=max_new, use_kv_cache=True)
    res = eng.analyze(image, max_new_tokens=max_new)
    _compare(res, ref_out, ref, image, f"{which}/{name}")
    return res, ref_out


FREE_PICTURES = ["1x1", "1x257", "193x1", "7x3", "333x1001", "2001x17", "gray", "rgba", "rgb16", "rotated6",
                 "rotated8_photo", "photo_rocket", "photo_chelsea", "photo_coffee", "photo_camera_gray"]  # fmt: skip


def test_free_model_every_picture(models, pictures):
    """Text that depends on the picture: token identity checks the whole image path, picture by picture."""
    texts = {}
    segs = 0
    for name in FREE_PICTURES:
        res, _ = _run_both(models, "free11", pictures[name], name)
        texts[name] = tuple(res.token_ids)
        segs += len(res.artifacts)
    # The comparison is only worth something if the pictures really lead to different texts, with masks.
    assert len(set(texts.values())) >= len(texts) - 2, f"too many pictures share a text: {texts}"
    assert segs >= len(texts), "too few [SEG] masks: the mask path was hardly compared"
    # The margins of the reference's own greedy path on the real photos (how far each choice is from a tie).
    _, ref, _ = models["free11"]
    for name in ("photo_rocket", "photo_chelsea"):
        margins = _reference_margins(ref, pictures[name], list(texts[name]))
        MEASURED["min_margin"] = min(MEASURED["min_margin"], min(margins))


def test_loop_model_pictures(models, pictures):
    """The default steered model (`legion-rt make-tiny --seed 23`): masks and detector on odd pictures."""
    for name in ("1x1", "7x3", "2001x17", "rgba", "rgb16", "rotated6", "photo_coffee", "photo_camera_gray"):
        _run_both(models, "loop23", pictures[name], name)


def test_free_model_matches_the_original_no_cache_loop(models, pictures):
    """The original's decoding (no KV cache, CLIP every step, [SEG] states from the last full pass): quadratic,
    so one real photo only."""
    eng, ref, _ = models["free11"]
    image = pictures["photo_rocket"]
    ref_out = ref.run(image, max_new_tokens=32, use_kv_cache=False)
    res = eng.analyze(image, max_new_tokens=32)
    _compare(res, ref_out, ref, image, "free11/photo_rocket/no-cache")
    assert len(res.artifacts) > 0


def test_analyze_inputs_agree(models, pictures):
    """path, bytes, PIL.Image and ndarray inputs of one real photo give the same result."""
    eng, _, _ = models["free11"]
    path = pictures["rotated8_photo"]
    base = eng.analyze(path, max_new_tokens=24)
    rgb = eng.analyze(str(path), max_new_tokens=1)  # noqa: F841 - str path accepted
    for src in (path.read_bytes(), Image.open(path)):
        assert eng.analyze(src, max_new_tokens=24).token_ids == base.token_ids


def test_cli_analyze_json_and_overlay(models, pictures, tmp_path):
    """`legion-rt analyze IMAGE --artifacts ART --json F --overlay O`: files as docs/CONTRACT.md says, equal to the
    reference."""
    eng, ref, art = models["free11"]
    for name in ("photo_chelsea", "333x1001"):
        image = pictures[name]
        js, ov = tmp_path / f"{name}.json", tmp_path / f"{name}.png"
        # default threads, as an outside checker runs it
        args = ["analyze", str(image), "--artifacts", str(art), "--json", str(js), "--overlay", str(ov)]
        proc = _cli(*args, "--max-new-tokens", str(MAX_NEW))
        _ok(proc)
        doc = json.loads(js.read_text())
        ref_out = ref.run(image, max_new_tokens=MAX_NEW, use_kv_cache=True)
        _check_tokens(doc["token_ids"], ref_out.token_ids, ref, image, f"cli/{name}")
        for key in ("verdict", "fake_probability", "explanation", "text", "token_ids", "artifacts"):
            assert key in doc, f"{name}: JSON lacks {key!r}"
        assert doc["text"] == ref_out.text and doc["explanation"] == ref_out.explanation
        assert doc["verdict"] == ref_out.verdict
        assert abs(doc["fake_probability"] - ref_out.fake_probability) <= PROB_TOL
        assert [a["phrase"] for a in doc["artifacts"]] == list(ref_out.mask_phrases)
        h, w = ref_out.original_size
        for a, m in zip(doc["artifacts"], ref_out.masks, strict=True):
            x0, y0, x1, y1 = a["bbox"]
            assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
            assert abs(a["area"] - int(m.sum())) <= 0.01 * max(1, int(m.sum())), (a["area"], int(m.sum()))
        assert doc["image_size"] == [h, w]
        with Image.open(ov) as im:
            assert im.format == "PNG" and im.size == (w, h), (im.format, im.size, (w, h))
        # the streamed answer on stdout is the explanation's text as generated
        assert proc.stdout.strip(), "nothing streamed to stdout"


def test_bad_pictures_are_clean_errors(models, tmp_path):
    """What the reference cannot read, the product refuses with a typed error (API) or one stderr line (CLI)."""
    eng, ref, art = models["free11"]
    junk = tmp_path / "truncated.png"
    good = tmp_path / "good.png"
    Image.fromarray(_smooth(40, 40, 3)).save(good)
    junk.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ImageError):
        ref.run(junk, max_new_tokens=2)  # OpenCV cannot decode it either
    with pytest.raises(ImageError, match="truncated.png"):
        eng.analyze(junk, max_new_tokens=2)
    with pytest.raises(ImageError):
        eng.analyze(np.zeros((0, 5, 3), np.uint8), max_new_tokens=2)
    proc = _cli("analyze", str(junk), "--artifacts", str(art), "--max-new-tokens", "2")
    assert proc.returncode == 1, proc
    assert "truncated.png" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.slow
def test_large_jpeg(models, tmp_path):
    """A 3000x4000 camera-sized JPEG (12 Mpx): masks upsampled to full size on both sides."""
    p = tmp_path / "large.jpg"
    small = np.asarray(Image.open(PHOTOS / "coffee.jpg"))
    Image.fromarray(small).resize((3000, 4000), Image.Resampling.BICUBIC).save(p, quality=90)
    res, ref_out = _run_both(models, "free11", p, "large_3000x4000", max_new=24)
    assert res.mask.shape == (4000, 3000)


def test_too_elongated_pictures_are_clean_errors(models, tmp_path):
    """1x3000 and 2100x1: SAM's ResizeLongestSide gives a side of int(1 * 1024 / 3000 + 0.5) = 0 pixels, where the
    reference fails (PIL: "height and width must be > 0"). The product must refuse them with an ImageError / one
    stderr line, not crash (it used to die with SIGSEGV in the native preprocess). Run in child processes so a crash
    is reported, not fatal to the test session."""
    _, ref, art = models["free11"]
    for h, w in ((1, 3000), (2100, 1), (1, 2049)):
        p = tmp_path / f"thin_{h}x{w}.png"
        Image.fromarray(_smooth(h, w, 5)).save(p)
        with pytest.raises(Exception, match="height and width must be > 0"):
            ref.run(p, max_new_tokens=2)
        code = (
            "import sys\nfrom legion_rt import Engine, ImageError\n"
            f"eng = Engine({str(art)!r}, threads=1, verify='none')\n"
            f"try:\n    eng.analyze({str(p)!r}, max_new_tokens=2)\nexcept ImageError as e:\n"
            "    print('ImageError:', e)\n    sys.exit(0)\nprint('no error')\nsys.exit(3)\n"
        )
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                              timeout=120)  # fmt: skip
        assert proc.returncode == 0, (
            f"{h}x{w}: Engine.analyze exit {proc.returncode} (-11 = SIGSEGV), want ImageError; "
            f"stdout {proc.stdout[-500:]!r} stderr {proc.stderr[-500:]!r}"
        )
        assert p.name in proc.stdout, proc.stdout
        cli = _cli("analyze", str(p), "--artifacts", str(art), "--max-new-tokens", "2", "--verify", "none")
        assert cli.returncode == 1, f"{h}x{w}: legion-rt analyze exit {cli.returncode}: {cli.stderr[-500:]}"
        errors = [line for line in cli.stderr.splitlines() if line.startswith("legion-rt: error:")]
        assert len(errors) == 1 and p.name in errors[0] and "Traceback" not in cli.stderr, cli.stderr


def test_long_generation_past_eos(models, pictures):
    """300 tokens (ignore_eos on both sides): the KV cache far past the prompt, many phrases and masks."""
    eng, ref, _ = models["free11"]
    image = pictures["photo_coffee"]
    ref_out = ref.run(image, max_new_tokens=300, use_kv_cache=True, ignore_eos=True)
    res = eng.analyze(image, max_new_tokens=300, ignore_eos=True)
    _compare(res, ref_out, ref, image, "free11/photo_coffee/300 tokens")
    assert len(res.token_ids) == 300 and len(res.artifacts) >= 10


def test_stream_events_and_concurrency_on_image_dependent_text(models, pictures):
    """With texts that differ per picture: streamed events agree with the Result, and concurrent requests on one
    Engine give each picture its own answer (a mixed-up KV cache or text stream would show in the token ids)."""
    import threading

    from legion_rt.engine import DoneEvent, MaskEvent, TokenEvent

    eng, _, _ = models["free11"]
    names = ["photo_rocket", "photo_chelsea", "photo_coffee", "333x1001"]
    sequential = {n: eng.analyze(pictures[n], max_new_tokens=MAX_NEW) for n in names}
    assert len({tuple(r.token_ids) for r in sequential.values()}) == len(names)
    for n in names[:2]:
        events = list(eng.stream(pictures[n], max_new_tokens=MAX_NEW))
        result = events[-1].result
        assert isinstance(events[-1], DoneEvent)
        assert [e.token_id for e in events if isinstance(e, TokenEvent)] == sequential[n].token_ids
        masks = [e.artifact for e in events if isinstance(e, MaskEvent)]
        assert [m.phrase for m in masks] == [a.phrase for a in result.artifacts], n
        for m, a in zip(masks, result.artifacts, strict=True):
            assert m.bbox == a.bbox and np.array_equal(m.mask, a.mask)
    results, errors = {}, []

    def work(n):
        try:
            results[n] = eng.analyze(pictures[n], max_new_tokens=MAX_NEW)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for n in names:
        a, b = sequential[n], results[n]
        assert a.token_ids == b.token_ids and a.text == b.text, n
        assert [x.phrase for x in a.artifacts] == [y.phrase for y in b.artifacts], n
        assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.artifacts, b.artifacts, strict=True)), n


def test_native_preprocess_refuses_too_elongated_pictures():
    """legion_rt.ops.preprocess (public low-level API) on 1x3000: the SAM size rounds to (0, 1024). It must raise
    ImageError like other bad inputs; it used to crash the process with SIGSEGV (the Engine now checks first, but the
    op itself must not crash). Run in a child process so a crash is reported, not fatal to the test session."""
    code = (
        "import sys, numpy as np\nimport legion_rt.ops as ops\nfrom legion_rt import ImageError\n"
        "for shape in ((1, 3000, 3), (3000, 1, 3), (2, 4100, 3)):\n"
        "    try:\n        ops.preprocess(np.full(shape, 77, np.uint8))\n"
        "    except ImageError as e:\n        print('ImageError:', e)\n        continue\n"
        "    print('no error for', shape)\n    sys.exit(3)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=60
    )
    assert proc.returncode == 0, (
        f"ops.preprocess exit {proc.returncode} (-11 = SIGSEGV), want ImageError; stdout {proc.stdout[-400:]!r} "
        f"stderr {proc.stderr[-400:]!r}"
    )


@pytest.mark.slow
def test_small_free_model_on_photos(tmp_path):
    """The 'small' size (hidden 512, 6 layers), free text, seed 23: real photos against the reference.
    Measured (2 cores): export 32 s; tokens and texts identical, min mask IoU 0.99999, |dP| <= 4e-8."""
    from legion_rt.export.onnx_export import export_artifacts
    from legion_rt.export.reference import ReferencePipeline
    from legion_rt.export.tiny import make_tiny

    paths = make_tiny(tmp_path / "small23", seed=23, size="small", steer="free")
    art = export_artifacts(
        checkpoint=paths.checkpoint,
        clip=paths.clip,
        detector=paths.detector,
        out=tmp_path / "art",
        progress=False,
    )
    torch.set_num_threads(1)
    ref = ReferencePipeline.from_checkpoint(paths.checkpoint, paths.clip, paths.detector)
    texts = set()
    with Engine(art, threads=1) as eng:
        for f in ("rocket.jpg", "chelsea.jpg", "camera_gray.png"):
            image = PHOTOS / f
            ref_out = ref.run(image, max_new_tokens=MAX_NEW, use_kv_cache=True)
            res = eng.analyze(image, max_new_tokens=MAX_NEW)
            _compare(res, ref_out, ref, image, f"small23/{f}")
            texts.add(tuple(res.token_ids))
    assert len(texts) == 3
