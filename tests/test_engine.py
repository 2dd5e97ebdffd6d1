"""legion_rt.Engine against the reference pipeline (export.reference.ReferencePipeline, PyTorch fp32, KV-cached
greedy; its no-cache mode is checked against the KV mode in tests/test_reference.py) on tiny random-weight models:
identical token ids, masks (IoU), explanation, phrases and detector probability; streaming; gating; threads;
option validation; artifact tampering; bad pictures."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

import legion_rt
from legion_rt import ArtifactError, ImageError, RequestError
from legion_rt.artifacts import load_artifacts
from legion_rt.engine import DoneEvent, Engine, MaskEvent, TokenEvent

pytest.importorskip("torch", reason="the reference pipeline (export stage) needs torch")

MAX_NEW = 48  # enough for several [SEG] with the tiny models; keeps the reference fast on 2 cores
# Detector probability: ONNX Runtime vs PyTorch fp32, measured max |diff| 6.5e-8 (seed 0, 5 pictures); bound 1e-4
# (the issue's).
PROB_TOL = 1e-4
# Mask IoU bound from the issue; measured min 0.999995 (at most 4 differing pixels, on the 2100x1500 picture).
IOU_MIN = 0.99


def _pictures(tmp_path):
    """Several pictures: odd sizes, grayscale, a large one, an EXIF-rotated JPEG, RGBA."""
    rng = np.random.default_rng(123)
    y, x = np.mgrid[0:257, 0:391]
    smooth = np.stack([128 + 90 * np.sin(x / (9 + 4 * k)) * np.cos(y / (7 + 3 * k)) for k in range(3)], 2)
    smooth = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
    out = {}
    p = tmp_path / "odd.png"
    Image.fromarray(smooth[:37, :53]).save(p)
    out["odd"] = p
    p = tmp_path / "gray.png"
    Image.fromarray(smooth[:, :, 1]).save(p)
    out["gray"] = p
    p = tmp_path / "large.jpg"
    Image.fromarray(smooth).resize((2100, 1500), Image.Resampling.BICUBIC).save(p, quality=90)
    out["large"] = p
    p = tmp_path / "rotated.jpg"
    ex = Image.Exif()
    ex[0x0112] = 6
    Image.fromarray(smooth[:120, :200]).save(p, exif=ex, quality=92)
    out["rotated"] = p
    p = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([smooth[:99, :77], smooth[:99, :77, :1]]), "RGBA").save(p)
    out["rgba"] = p
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.fixture(scope="module")
def engine(tiny_artifacts):
    eng = Engine(tiny_artifacts, backend="onnxruntime", threads=1)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def reference(tiny_paths):
    import torch

    from legion_rt.export.reference import ReferencePipeline

    torch.set_num_threads(1)
    return ReferencePipeline.from_checkpoint(tiny_paths.checkpoint, tiny_paths.clip, tiny_paths.detector)


@pytest.fixture(scope="module")
def seed1(tmp_path_factory):
    """A second tiny model (seed 1): checkpoint, artifacts, engine, reference."""
    import torch

    from legion_rt.export.onnx_export import export_artifacts
    from legion_rt.export.reference import ReferencePipeline
    from legion_rt.export.tiny import make_tiny

    paths = make_tiny(tmp_path_factory.mktemp("tiny-seed1"), seed=1, size="tiny")
    art = export_artifacts(
        checkpoint=paths.checkpoint,
        clip=paths.clip,
        detector=paths.detector,
        out=tmp_path_factory.mktemp("tiny-seed1-art") / "art",
        progress=False,
    )
    torch.set_num_threads(1)
    ref = ReferencePipeline.from_checkpoint(paths.checkpoint, paths.clip, paths.detector)
    eng = Engine(art, backend="onnxruntime", threads=1)
    yield eng, ref
    eng.close()


def _compare(res, ref, name):
    assert res.token_ids == ref.token_ids, f"{name}: token ids differ"
    assert res.text == ref.text, name
    assert res.explanation == ref.explanation, name
    assert res.phrases == list(ref.phrases), name
    assert [a.phrase for a in res.artifacts] == list(ref.mask_phrases), name
    assert len(res.artifacts) == ref.masks.shape[0], name
    for i, a in enumerate(res.artifacts):
        iou = _iou(a.mask, ref.masks[i])
        assert iou >= IOU_MIN, f"{name}: mask {i} IoU {iou:.4f}"
        assert a.mask.shape == ref.original_size
    assert _iou(res.mask, ref.mask) >= IOU_MIN
    if ref.fake_probability is None:
        assert res.fake_probability is None and res.verdict is None
    else:
        assert abs(res.fake_probability - ref.fake_probability) <= PROB_TOL, name
        assert res.verdict == ref.verdict, name
    return max((1 - _iou(a.mask, ref.masks[i]) for i, a in enumerate(res.artifacts)), default=0.0)


def test_matches_reference_seed0(engine, reference, tmp_path):
    pics = _pictures(tmp_path)
    total_segs = 0
    for name, path in pics.items():
        ref = reference.run(path, max_new_tokens=MAX_NEW, use_kv_cache=True)
        res = engine.analyze(path, max_new_tokens=MAX_NEW)
        _compare(res, ref, name)
        total_segs += len(res.artifacts)
        assert res.mask.shape == ref.original_size
        for a in res.artifacts:  # bbox / area agree with the mask
            ys, xs = np.nonzero(a.mask)
            assert a.area == len(ys)
            if a.area:
                assert a.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    # The comparison must exercise the [SEG] -> mask path, not only text.
    assert total_segs > 0, "no [SEG] generated on any picture: the mask path was not compared"


def test_matches_reference_seed1(seed1, tmp_path):
    eng, ref_pipe = seed1
    pics = _pictures(tmp_path)
    for name in ("odd", "gray", "large"):
        ref = ref_pipe.run(pics[name], max_new_tokens=MAX_NEW, use_kv_cache=True)
        _compare(eng.analyze(pics[name], max_new_tokens=MAX_NEW), ref, f"seed1/{name}")


def test_inputs_of_every_kind_give_the_same_result(engine, tmp_path):
    path = _pictures(tmp_path)["odd"]
    base = engine.analyze(path, max_new_tokens=16)
    rgb = np.asarray(Image.open(path).convert("RGB"))
    for src in (path.read_bytes(), Image.open(path), rgb, str(path)):
        assert engine.analyze(src, max_new_tokens=16).token_ids == base.token_ids


def test_stream_consistent_with_analyze(engine, tmp_path):
    path = _pictures(tmp_path)["rgba"]
    events = list(engine.stream(path, max_new_tokens=MAX_NEW))
    assert isinstance(events[-1], DoneEvent) and sum(isinstance(e, DoneEvent) for e in events) == 1
    result = events[-1].result
    tokens = [e.token_id for e in events if isinstance(e, TokenEvent)]
    masks = [e.artifact for e in events if isinstance(e, MaskEvent)]
    assert tokens == result.token_ids == engine.analyze(path, max_new_tokens=MAX_NEW).token_ids
    assert len(masks) == len(result.artifacts)
    for m, a in zip(masks, result.artifacts, strict=True):
        assert (
            m.phrase == a.phrase and m.bbox == a.bbox and m.area == a.area and np.array_equal(m.mask, a.mask)
        )
    # each MaskEvent comes after the TokenEvent of its [SEG]
    seen_tokens = 0
    for e in events:
        if isinstance(e, TokenEvent):
            seen_tokens += 1
        elif isinstance(e, MaskEvent):
            assert seen_tokens > e.artifact.token_index
            assert result.token_ids[e.artifact.token_index] == engine.seg_id
    # the streamed text deltas add up to the decoded answer's tail
    streamed = "".join(e.text for e in events if isinstance(e, TokenEvent))
    prompt = engine.prefix_ids + engine.suffix_ids
    full = engine.detok.decode(prompt + result.token_ids)
    head = engine.detok.decode(prompt)
    assert full.startswith(head) and streamed == full[len(head) :]


def test_timings_and_fields(engine, tmp_path):
    res = engine.analyze(_pictures(tmp_path)["odd"], max_new_tokens=8)
    for k in ("preprocess", "vision", "sam_encoder", "prefill", "decode", "masks", "total"):
        assert k in res.timings and res.timings[k] >= 0.0
    assert res.timings["total"] >= res.timings["prefill"]
    assert 1 <= len(res.token_ids) <= 8
    if res.artifacts:  # the SAM encoder ran for the masks: its time is measured, not left at 0
        assert res.timings["sam_encoder"] > 0.0 and res.timings["masks"] > 0.0
    assert res.label in (0, 1) and res.verdict == ("real" if res.label == 1 else "fake")
    assert 0.0 <= res.fake_probability <= 1.0
    z = np.asarray(res.cls_logits)
    assert abs(res.fake_probability - float(np.exp(z[0]) / np.exp(z).sum())) < 1e-12
    json.dumps(res.to_dict())  # JSON-ready
    assert engine.providers == ["CPUExecutionProvider"] and engine.backend_name == "onnxruntime"


def test_sampling_options(engine, tmp_path):
    path = _pictures(tmp_path)["odd"]
    greedy = engine.analyze(path, max_new_tokens=20).token_ids
    a = engine.analyze(path, max_new_tokens=20, temperature=1.0, seed=5).token_ids
    b = engine.analyze(path, max_new_tokens=20, temperature=1.0, seed=5).token_ids
    assert a == b  # same seed, same tokens
    # top_p so small that only the most likely token survives: sampling degenerates to greedy
    assert engine.analyze(path, max_new_tokens=20, temperature=0.7, top_p=1e-9, seed=1).token_ids == greedy
    forced = engine.analyze(path, max_new_tokens=30, ignore_eos=True)
    assert len(forced.token_ids) == 30


def test_gating(engine, tmp_path):
    path = _pictures(tmp_path)["odd"]
    full = engine.analyze(path, max_new_tokens=12)
    p_real = 1.0 - full.fake_probability
    skipped = engine.analyze(path, max_new_tokens=12, skip_if_real=0.0)  # P(real) >= 0 always
    assert skipped.skipped and skipped.text is None and skipped.explanation is None
    assert skipped.token_ids == [] and skipped.artifacts == [] and not skipped.mask.any()
    assert skipped.verdict == full.verdict and skipped.fake_probability == full.fake_probability
    assert skipped.mask.shape == full.mask.shape
    not_skipped = engine.analyze(path, max_new_tokens=12, skip_if_real=min(1.0, p_real + 1e-6))
    assert not not_skipped.skipped and not_skipped.token_ids == full.token_ids
    at = engine.analyze(path, max_new_tokens=12, skip_if_real=p_real)  # threshold is inclusive
    assert at.skipped


def test_thread_safety(engine, tmp_path):
    pics = _pictures(tmp_path)
    names = ["odd", "gray", "rotated", "rgba"]
    sequential = {n: engine.analyze(pics[n], max_new_tokens=MAX_NEW) for n in names}
    results: dict[str, object] = {}
    errors = []

    def work(n):
        try:
            results[n] = engine.analyze(pics[n], max_new_tokens=MAX_NEW)
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
        assert len(a.artifacts) == len(b.artifacts)
        for x, y in zip(a.artifacts, b.artifacts, strict=True):
            assert np.array_equal(x.mask, y.mask) and x.phrase == y.phrase
        assert a.fake_probability == b.fake_probability


def test_bad_options(engine, tmp_path):
    path = _pictures(tmp_path)["odd"]
    too_many = engine.max_positions - engine.prompt_length + 1
    for kw in (
        {"max_new_tokens": 0},
        {"max_new_tokens": too_many},
        {"max_new_tokens": 2.5},
        {"temperature": -1.0},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"skip_if_real": 1.5},
        {"skip_if_real": -0.1},
        {"seed": "x"},
    ):
        with pytest.raises(RequestError):
            engine.stream(path, **kw)
    engine.analyze(path, max_new_tokens=1)  # the boundary values are fine
    assert len(engine.analyze(path, max_new_tokens=1).token_ids) == 1


def test_bad_images(engine, tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageError, match="junk.jpg"):
        engine.analyze(junk)
    with pytest.raises(ImageError):
        engine.analyze(b"")
    with pytest.raises(ImageError):
        engine.analyze(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(ImageError, match="float32"):
        engine.analyze(np.zeros((10, 10, 3), np.float32))


def _copy(art, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(art, dst)
    return dst


def test_artifact_tampering(tiny_artifacts, tmp_path):
    art = _copy(tiny_artifacts, tmp_path)
    data = bytearray((art / "vision.onnx").read_bytes())
    data[len(data) // 2] ^= 0x40
    (art / "vision.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"vision\.onnx: sha256 mismatch"):
        Engine(art)
    shutil.rmtree(art)

    art = _copy(tiny_artifacts, tmp_path)
    (art / "embed_tokens.npy").unlink()
    with pytest.raises(ArtifactError, match=r"embed_tokens\.npy"):
        Engine(art)
    shutil.rmtree(art)

    art = _copy(tiny_artifacts, tmp_path)
    m = json.loads((art / "manifest.json").read_text())
    m["files"]["../outside.bin"] = {"sha256": "0" * 64, "bytes": 1}
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="outside.bin"):
        Engine(art)
    m["files"].pop("../outside.bin")
    m["format_version"] = 999
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="format_version 999"):
        Engine(art)


def test_unavailable_provider_is_an_error(tiny_artifacts):
    import importlib.util

    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(legion_rt.BackendError, match="CUDAExecutionProvider"):
            Engine(tiny_artifacts, backend="onnxruntime", providers=["cuda"])
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(legion_rt.BackendError, match="TensorRT is not installed"):
            Engine(tiny_artifacts, backend="tensorrt")
    with pytest.raises(RequestError):
        Engine(tiny_artifacts, backend="magic")
    eng = Engine(tiny_artifacts, backend="auto", verify="size")  # auto reports what it picked
    assert eng.backend_name == "onnxruntime" and eng.providers[-1] == "CPUExecutionProvider"
    eng.close()


def test_sam_start_does_not_change_results(engine, tiny_artifacts, tmp_path):
    path = _pictures(tmp_path)["gray"]
    base = engine.analyze(path, max_new_tokens=MAX_NEW)
    for mode in ("early", "after_prefill"):
        with Engine(tiny_artifacts, threads=1, verify="none", sam_start=mode) as eng:
            assert eng.sam_start == mode
            res = eng.analyze(path, max_new_tokens=MAX_NEW)
        assert res.token_ids == base.token_ids and len(res.artifacts) == len(base.artifacts)
        for a, b in zip(res.artifacts, base.artifacts, strict=True):
            assert np.array_equal(a.mask, b.mask) and a.phrase == b.phrase
    with pytest.raises(RequestError, match="sam_start"):
        Engine(tiny_artifacts, verify="none", sam_start="later")


def test_matches_reference_without_kv_cache(engine, reference, tmp_path):
    # The original's own decoding (whole sequence + CLIP every step, [SEG] states from the last full pass).
    path = _pictures(tmp_path)["odd"]
    ref = reference.run(path, max_new_tokens=MAX_NEW, use_kv_cache=False)
    res = engine.analyze(path, max_new_tokens=MAX_NEW)
    _compare(res, ref, "odd/no-cache")
    assert len(res.artifacts) > 0


def test_without_detector(tiny_paths, tmp_path_factory, tmp_path):
    """Artifacts exported without a detector: verdict and probability are None, gating is refused."""
    from legion_rt.export.onnx_export import export_artifacts

    art = export_artifacts(
        checkpoint=tiny_paths.checkpoint,
        clip=tiny_paths.clip,
        detector=None,
        out=tmp_path_factory.mktemp("tiny-nodet") / "art",
        progress=False,
    )
    with Engine(art, threads=1) as eng:
        assert not eng.has_detector
        res = eng.analyze(_pictures(tmp_path)["odd"], max_new_tokens=12)
        assert res.verdict is None and res.fake_probability is None and res.label is None
        assert len(res.token_ids) >= 1
        with pytest.raises(RequestError, match="no detector"):
            eng.analyze(_pictures(tmp_path)["odd"], skip_if_real=0.5)


def test_closing_a_stream_stops_the_work_and_frees_the_kv_cache(engine, tmp_path, monkeypatch):
    """A consumer that stops iterating: the decode loop stops at once, the KV buffers are freed, the slot is back."""
    import gc
    import weakref

    llm = engine._backend.llm
    calls = [0]
    forward = llm.forward

    def counting(cache, embeds):
        calls[0] += 1
        return forward(cache, embeds)

    monkeypatch.setattr(llm, "forward", counting)
    req = engine.stream(_pictures(tmp_path)["odd"], max_new_tokens=300, ignore_eos=True)
    events = [next(req) for _ in range(6)]
    assert all(isinstance(e, TokenEvent) for e in events)
    buffers = [weakref.ref(a) for a in req.cache.keys + req.cache.values]  # the request's own KV memory
    assert engine.running_requests == 1
    req.close()
    n = calls[0]
    gc.collect()
    assert all(b() is None for b in buffers) and engine.running_requests == 0
    assert n <= 7 and calls[0] == n  # prefill + 5 steps (+ none after the close)


def test_admission_busy_and_deadline_on_a_real_engine(tiny_artifacts, tmp_path):
    from legion_rt import BusyError, DeadlineError

    pic = _pictures(tmp_path)["odd"]
    with Engine(tiny_artifacts, threads=1, verify="size", max_concurrency=1, max_queue=0) as eng:
        first = eng.stream(pic, max_new_tokens=4)  # admitted at the call: holds the only slot
        assert (eng.running_requests, eng.queued_requests) == (1, 0)
        with pytest.raises(BusyError, match="max_concurrency=1, max_queue=0"):
            eng.analyze(pic, max_new_tokens=4)
        done = [e for e in first if isinstance(e, DoneEvent)]
        assert len(done) == 1 and eng.running_requests == 0
        again = eng.analyze(pic, max_new_tokens=4)
        assert again.token_ids == done[0].result.token_ids
        with pytest.raises(DeadlineError, match="timeout_s=0.5"):
            for _ in eng.stream(pic, max_new_tokens=3000, ignore_eos=True, timeout_s=0.5):
                pass
        assert eng.running_requests == 0
        for bad in (0, -1, float("nan"), float("inf"), "1", True):
            with pytest.raises(RequestError, match="timeout_s"):
                eng.stream(pic, timeout_s=bad)
        assert eng.running_requests == 0  # a refused request takes no slot


def test_vision_and_sam_runs_give_the_cpu_arena_back(tiny_artifacts):
    """The vision and SAM encoder runs ask ONNX Runtime to shrink its CPU arena at the end of the run (the 7B-shaped
    SAM ViT-H grew the process by 4.5 GB per run otherwise, benchmarks/README.md); the LLM's decode keeps its arena."""
    from legion_rt.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(load_artifacts(tiny_artifacts), threads=1)
    seen = {}
    for graph in ("vision", "sam_encoder"):
        real = backend._sessions[graph]

        class Recording:
            def __init__(self, sess, name):
                self.sess, self.name = sess, name

            def run(self, outs, feeds, run_options=None):
                seen[self.name] = run_options
                return self.sess.run(outs, feeds, run_options)

        backend._sessions[graph] = Recording(real, graph)
    backend.vision(np.zeros((1, 3, 336, 336), np.float32))
    backend.sam_encoder(np.zeros((1, 3, 1024, 1024), np.float32))
    for graph in ("vision", "sam_encoder"):
        assert seen[graph].get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0", graph
    assert backend._run_options["llm"] is None
