"""The reference pipeline (export/reference.py): preprocessing against transformers / the SAM formulas, and
no-cache decoding (as the original) against KV-cached decoding on tiny random models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="export-stage tests need torch (pip install .[export])")

from legion_rt.errors import ImageError, RequestError  # noqa: E402
from legion_rt.export.reference import (  # noqa: E402
    PreprocessConstants,
    clip_preprocess,
    clip_resize_shape,
    load_image,
    postprocess_masks,
    reference_postprocess,
    sam_preprocess,
    sam_resize_shape,
)

# Odd sizes: 1- and 3-pixel-tall pictures (transformers' channels-first guess), 4-tall (5.x also guesses there),
# off-by-one squares, very wide/tall, exact 336 and exact 1024.
ODD_SIZES = [
    (1, 7),
    (3, 500),
    (4, 4),
    (337, 336),
    (336, 337),
    (480, 640),
    (641, 479),
    (1000, 333),
    (50, 2000),
    (336, 336),
    (1024, 700),
    (1500, 1024),
]


def _rand_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# CLIP branch
# ---------------------------------------------------------------------------------------------------------------


def test_clip_preprocess_matches_transformers_pil_processor():
    """transformers 5.x: ``CLIPImageProcessor`` is the torchvision backend (not installed here, and not what the
    4.28 reference ran); ``CLIPImageProcessorPil`` is the Pillow path with 4.28's arithmetic (rescale in float64 ->
    float32, normalize in float32). Measured max abs error: 0.0 on every size (bit-exact)."""
    pil_mod = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    proc = pil_mod.CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    worst = 0.0
    for i, (h, w) in enumerate(ODD_SIZES):
        img = _rand_image(h, w, seed=i)
        # input_data_format pins HxWx3: without it transformers misreads 1/3/4-pixel-tall pictures (see below).
        ref = proc(img, return_tensors="np", input_data_format="channels_last")["pixel_values"][0]
        ours = clip_preprocess(img).numpy()
        assert ours.shape == (1, 3, 336, 336) and ours.dtype == np.float32
        worst = max(worst, float(np.abs(ref - ours[0]).max()))
    print(f"CLIP preprocessing vs CLIPImageProcessorPil: max abs error {worst}")
    assert worst == 0.0


def test_clip_preprocess_does_not_copy_channels_first_quirk():
    """transformers (4.28: height 1 or 3; 5.x: height 1, 3 or 4) takes an HxWx3 picture that short for CHW. The
    reference pipeline treats every picture as HxWx3: its output equals the processor's with channels_last."""
    pil_mod = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    proc = pil_mod.CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    img = _rand_image(3, 50, seed=7)
    guessed = proc(img, return_tensors="np")["pixel_values"][0]  # read as 3 channels of a 50x3 picture
    pinned = proc(img, return_tensors="np", input_data_format="channels_last")["pixel_values"][0]
    ours = clip_preprocess(img).numpy()[0]
    assert not np.array_equal(guessed, pinned)
    np.testing.assert_array_equal(ours, pinned)


def test_clip_resize_shape_and_constants(tmp_path):
    assert clip_resize_shape(480, 640, 336) == (336, 448)
    assert clip_resize_shape(641, 479, 336) == (int(336 * 641 / 479), 336)
    assert clip_resize_shape(1, 7, 336) == (336, 2352)
    (tmp_path / "preprocessor_config.json").write_text(
        '{"crop_size": 336, "size": 336, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}'
    )
    c = PreprocessConstants.from_clip_dir(tmp_path)
    assert (c.clip_resize, c.clip_crop, c.clip_mean, c.clip_std) == (336, 336, (0.5,) * 3, (0.25,) * 3)
    img = _rand_image(20, 30)
    x = clip_preprocess(img, c).numpy()[0]
    # centre pixel by hand: bicubic resize to 336x504, crop columns 84..420
    from PIL import Image

    r = np.asarray(Image.fromarray(img).resize((504, 336), Image.Resampling.BICUBIC))[:, 84:420]
    scaled = (r.astype(np.float64) * (1 / 255)).astype(np.float32)
    want = ((scaled - np.float32(0.5)) / np.float32(0.25)).transpose(2, 0, 1)
    np.testing.assert_array_equal(x, want)


# ---------------------------------------------------------------------------------------------------------------
# SAM branch
# ---------------------------------------------------------------------------------------------------------------


def _segment_anything_preprocess_shape():
    """segment-anything's own ``ResizeLongestSide.get_preprocess_shape``. The package imports torchvision (not
    installed here) at import time; only the pure-python shape function is used, so stub modules are enough.
    Every module imported here is removed again afterwards."""
    import importlib
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("segment_anything") is None:
        pytest.skip("segment-anything is a test dependency (pip install .[test])")
    before = set(sys.modules)
    try:
        if importlib.util.find_spec("torchvision") is None:
            fn = types.ModuleType("torchvision.transforms.functional")
            fn.resize = fn.to_pil_image = None
            sys.modules["torchvision"] = types.ModuleType("torchvision")
            sys.modules["torchvision.transforms"] = types.ModuleType("torchvision.transforms")
            sys.modules["torchvision.transforms.functional"] = fn
        # Load the one file directly: the package __init__ pulls in modules with more missing dependencies.
        origin = Path(importlib.util.find_spec("segment_anything").origin).parent / "utils" / "transforms.py"
        spec = importlib.util.spec_from_file_location("_sa_transforms", origin)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.ResizeLongestSide.get_preprocess_shape
    finally:
        for name in set(sys.modules) - before:
            if name.startswith(("segment_anything", "torchvision", "_sa_transforms")):
                sys.modules.pop(name, None)


def test_sam_resize_shape_formula():
    sa_shape = _segment_anything_preprocess_shape()
    for h, w in ODD_SIZES + [(767, 1025), (2049, 3), (999, 1001)]:
        assert sam_resize_shape(h, w) == sa_shape(h, w, 1024), (h, w)
    # segment-anything get_preprocess_shape: scale = 1024 / max, int(x * scale + 0.5)
    assert sam_resize_shape(480, 640) == (768, 1024)
    assert sam_resize_shape(1000, 333) == (1024, int(333 * 1.024 + 0.5))
    assert sam_resize_shape(3, 500) == (int(3 * 1024 / 500 + 0.5), 1024)
    assert sam_resize_shape(1, 7) == (146, 1024)
    assert sam_resize_shape(1024, 1024) == (1024, 1024)


@pytest.mark.parametrize("h,w", [(3, 500), (480, 640), (1000, 333), (1024, 700), (1500, 1024)])
def test_sam_preprocess_values_and_padding(h, w):
    from PIL import Image

    img = _rand_image(h, w, seed=h)
    x, (nh, nw) = sam_preprocess(img)
    assert (nh, nw) == sam_resize_shape(h, w)
    assert x.shape == (1, 3, 1024, 1024) and x.dtype == torch.float32
    # padding: exact zeros right of w' and below h'
    assert torch.count_nonzero(x[..., nh:, :]) == 0 and torch.count_nonzero(x[..., :, nw:]) == 0
    # content: (PIL bilinear uint8 - mean) / std in float32
    r = np.asarray(Image.fromarray(img).resize((nw, nh), Image.Resampling.BILINEAR)).astype(np.float32)
    mean = np.array([123.675, 116.28, 103.53], np.float32)
    std = np.array([58.395, 57.12, 57.375], np.float32)
    want = ((r - mean) / std).transpose(2, 0, 1)
    got = x[0, :, :nh, :nw].numpy()
    err = float(np.abs(got - want).max())
    assert err <= 1e-6, err  # measured 0.0 (same float32 ops in torch and numpy)


# ---------------------------------------------------------------------------------------------------------------
# Image decoding and text post-processing
# ---------------------------------------------------------------------------------------------------------------


def test_load_image_is_cv2_imread_rgb(tmp_path):
    cv2 = pytest.importorskip("cv2", reason="opencv-python-headless is a test dependency")
    img = _rand_image(31, 17, seed=3)
    path = tmp_path / "p.png"
    cv2.imwrite(str(path), img[:, :, ::-1])  # stored as BGR by OpenCV: decoding must give img back
    np.testing.assert_array_equal(load_image(path), img)
    np.testing.assert_array_equal(load_image(path.read_bytes()), img)
    np.testing.assert_array_equal(load_image(img), img)
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not a picture")
    with pytest.raises(ImageError, match="bad.png"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(ImageError):
        load_image(img.astype(np.float32))


def test_reference_postprocess_transcribes_infer_py():
    decoded = (
        "<s> A chat ... USER: The <im_start> <im_end> provides ...\nPlease ... ASSISTANT: The <p> red  hand"
        " </p> [SEG] has six fingers.\n<p> 'sky' </p> [SEG]'</s>"
    )
    text, explanation, phrases = reference_postprocess(decoded)
    assert text == "The <p> red hand </p> [SEG] has six fingers.<p> 'sky' </p> [SEG]'</s>"
    assert phrases == ["red hand", "'sky'"]
    assert explanation == "The red hand has six fingers. 'sky'"


@pytest.fixture(scope="module")
def text_tools(tiny_paths, tmp_path_factory):
    """(slow tokenizer, runtime Detokenizer over the exported tokenizer.json, prompt ids, [SEG] id, </s> id)."""
    from legion_rt.export.tokenizer import (
        SlowLlamaTokenizer,
        prompt_ids,
        special_token_ids,
        write_tokenizer_json,
    )
    from legion_rt.text import Detokenizer

    ckpt = tiny_paths.checkpoint
    tj = write_tokenizer_json(ckpt, tmp_path_factory.mktemp("tok") / "tokenizer.json")
    det = Detokenizer.from_files(tj, ckpt / "tokenizer_config.json")
    prefix, suffix = prompt_ids(ckpt)
    ids = special_token_ids(ckpt)
    return SlowLlamaTokenizer.from_dir(ckpt), det, prefix + suffix, int(ids["seg"]), int(ids["eos"])


def test_reference_pair_phrases_rule_and_runtime_agree(text_tools):
    """The reference's own phrase pairing (export/reference.py, slow tokenizer) gives the original rule's answer on
    hand-made answers, and equals the runtime's independent implementation (legion_rt.text.pair_phrases, over
    tokenizer.json) on random ones."""
    import random

    from legion_rt.export.reference import reference_pair_phrases
    from legion_rt.text import pair_phrases

    slow, det, prompt, seg, eos = text_tools

    def both(gen):
        ref = reference_pair_phrases(slow.decode, prompt, gen, seg)
        assert ref == pair_phrases(det, prompt, gen, seg), gen
        return ref

    def enc(text):
        return slow.encode(text, add_bos=False)

    cases = [
        (" <p> the left hand </p> [SEG] is deformed, <p> the sky </p> [SEG] [SEG] and [SEG]",
         ["the left hand", "the sky", "the sky", "the sky"]),
        (" [SEG] first <p> a [SEG] b </p> [SEG]", [None, "a [SEG] b", "a [SEG] b"]),  # inside a phrase: that phrase
        (" <p> old </p> [SEG] ASSISTANT: <p> new </p> [SEG]", [None, "new"]),  # before the answer: None
        ("\n\n <p>  two  words \n</p>\n [SEG]  <p> open [SEG]", ["two words", "two words"]),  # steps 2-3, unclosed
        ("", []),
    ]  # fmt: skip
    for text, want in cases:
        assert both(enc(text)) == want, text
        assert both(enc(text) + [eos]) == want, text
    # "[SEG]" spelled with ordinary pieces is text, not the token
    spelled = slow.sp.encode("x[SEG]y")
    assert seg not in spelled
    assert both(enc(" <p> p1 </p>") + spelled + enc("[SEG]")) == ["p1"]

    rng = random.Random(11)
    words = ["<p>", "</p>", "[SEG]", " ", "  ", "\n", "hand", "ASSISTANT: ", "'", "<", "x", " ."]
    raw = [
        eos,
        slow.bos_id,
        slow.unk_id,
        seg,
        *(slow.sp.piece_to_id(f"<0x{b:02X}>") for b in (0x0A, 0x20, 0xE2)),
    ]
    paired = 0
    for _ in range(300):
        gen = enc("".join(rng.choice(words) for _ in range(rng.randrange(0, 20))))
        for _ in range(rng.randrange(0, 4)):  # special tokens and byte pieces anywhere
            gen.insert(rng.randrange(len(gen) + 1), rng.choice(raw))
        paired += sum(p is not None for p in both(gen))
    assert paired >= 20  # the random answers do pair phrases (measured: 32 [SEG]s get one)


# ---------------------------------------------------------------------------------------------------------------
# The pipeline on tiny random models: no-cache (as the original) vs KV cache
# ---------------------------------------------------------------------------------------------------------------

# The no-cache loop is quadratic (every step re-runs CLIP and the whole sequence): keep the tiny runs short.
NOCACHE_TOKENS = 40
# Per seed, odd sizes: tall, very wide, 1 pixel tall (CLIP resize 336 x 2352, SAM resize 146 x 1024), 3 pixels tall.
PIPELINE_SIZES = {0: [(123, 77), (333, 1000)], 1: [(1, 7)], 2: [(3, 500)]}


@pytest.fixture(scope="module")
def tiny_pipelines(tiny_paths, tmp_path_factory):
    """{seed: ReferencePipeline} for seeds 0 (the shared session checkpoint), 1 and 2."""
    from legion_rt.export.reference import ReferencePipeline
    from legion_rt.export.tiny import make_tiny

    torch.set_num_threads(1)
    paths = {0: tiny_paths}
    for seed in (1, 2):
        paths[seed] = make_tiny(tmp_path_factory.mktemp(f"tiny-seed{seed}"), seed=seed, size="tiny")
    return {s: ReferencePipeline.from_checkpoint(p.checkpoint, p.clip, p.detector) for s, p in paths.items()}


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nocache_and_kv_cache_agree(tiny_pipelines, seed):
    pipe = tiny_pipelines[seed]
    for i, (h, w) in enumerate(PIPELINE_SIZES[seed]):
        img = _rand_image(h, w, seed=100 * seed + i)
        ref = pipe.run(img, max_new_tokens=NOCACHE_TOKENS, use_kv_cache=False)
        kv = pipe.run(img, max_new_tokens=NOCACHE_TOKENS, use_kv_cache=True)
        assert ref.token_ids == kv.token_ids
        n_seg = ref.token_ids.count(pipe.seg_id)
        assert n_seg > 0, "make-tiny must bias the LM to emit [SEG]"
        assert ref.seg_positions == kv.seg_positions
        assert ref.seg_hidden.shape == kv.seg_hidden.shape == (n_seg, pipe.model.cfg.hidden_size)
        assert ref.masks.shape == kv.masks.shape == (n_seg, h, w)
        hid_err = float((ref.seg_hidden - kv.seg_hidden).abs().max())
        low_err = float((ref.low_res - kv.low_res).abs().max())
        ious = [_mask_iou(a, b) for a, b in zip(ref.masks, kv.masks, strict=True)]
        print(
            f"seed {seed} {h}x{w}: {len(ref.token_ids)} tokens, {n_seg} [SEG], hidden err {hid_err:.2e}, "
            f"low-res err {low_err:.2e}, min IoU {min(ious)}"
        )
        # measured over seeds 0-2 and these sizes: hidden <= 9.1e-6, low-res <= 3.2e-7 (float32 re-association:
        # the no-cache hidden states come from the last step's full-length pass, the cached ones from one position)
        assert hid_err <= 2e-5 and low_err <= 2e-6
        # Masks: equal except where the upsampled logit is within float noise of the 0 threshold. Measured: IoU 1.0
        # on 4 of 5 pictures; 0.99998 once (seed 0, 333x1000: 1 pixel with |logit| 6.4e-9 flipped).
        diff = ref.masks != kv.masks
        if diff.any():
            logits = postprocess_masks(ref.low_res, ref.resize_size, ref.original_size).numpy()
            edge = float(np.abs(logits[diff]).max())
            print(f"  {int(diff.sum())} pixels differ, all with |logit| <= {edge:.1e}")
            assert edge <= 1e-5
        assert min(ious) >= 0.9999
        assert ref.explanation == kv.explanation and ref.phrases == kv.phrases


def test_seg_hidden_alignment(tiny_pipelines):
    """The [SEG] hidden state is the final-norm output at the position BEFORE the [SEG] (whose logits produced it):
    recompute the whole final sequence in one forward pass and read those positions directly."""
    pipe = tiny_pipelines[0]
    img = _rand_image(64, 96, seed=5)
    out = pipe.run(img, max_new_tokens=NOCACHE_TOKENS, use_kv_cache=True)
    assert out.token_ids.count(pipe.seg_id) > 0
    want_pos = [out.prompt_length + j - 1 for j, t in enumerate(out.token_ids) if t == pipe.seg_id]
    assert out.seg_positions == want_pos
    with torch.no_grad():
        pre = pipe.preprocess(img)
        emb = pipe.inputs_embeds(pipe.vision(pre.clip_pixels).image_embeds, out.token_ids)
        hidden = pipe.model.llm.model(inputs_embeds=emb, use_cache=False).last_hidden_state[0]
        # and the logits at those positions do pick [SEG]
        picks = pipe.model.llm.lm_head(hidden[want_pos]).argmax(-1).tolist()
    assert picks == [pipe.seg_id] * len(want_pos)
    err = float((hidden[want_pos] - out.seg_hidden).abs().max())
    assert err <= 1e-4, err


def test_detector_and_text_fields(tiny_pipelines, tiny_paths):
    from legion_rt.export.tokenizer import SlowLlamaTokenizer

    pipe = tiny_pipelines[0]
    img = _rand_image(77, 51, seed=9)
    out = pipe.run(img, max_new_tokens=24, use_kv_cache=True)
    # detector: same CLIP pass, softmax index 0 = fake
    with torch.no_grad():
        _, cls = pipe.model.clip_features(clip_preprocess(img, pipe.consts))
        logits = pipe.model.detect(cls)[0]
    assert out.cls_logits is not None
    torch.testing.assert_close(out.cls_logits, logits, rtol=0, atol=0)
    assert out.fake_probability == pytest.approx(float(torch.softmax(logits.double(), 0)[0]), abs=1e-12)
    assert out.verdict == ("fake" if logits[0] >= logits[1] else "real")
    # text: the slow tokenizer's decode of prompt (no -200) + generated, then infer.py's post-processing
    slow = SlowLlamaTokenizer.from_dir(tiny_paths.checkpoint)
    decoded = slow.decode([*pipe.prompt.prefix_ids, *pipe.prompt.suffix_ids, *out.token_ids])
    assert out.decoded == decoded
    assert (out.text, out.explanation, out.phrases) == reference_postprocess(decoded)
    from legion_rt.text import postprocess_text

    post = postprocess_text(decoded)
    assert (post.answer, post.explanation, list(post.phrases)) == (out.text, out.explanation, out.phrases)
    assert len(out.mask_phrases) == out.token_ids.count(pipe.seg_id)
    assert all(p is None or p in out.phrases for p in out.mask_phrases)


def test_mask_phrases_agree_with_the_runtime_pairing(tiny_pipelines, text_tools, tmp_path_factory):
    """On the tiny models' own answers (loop: seed 0; free: seed 0, text that depends on the picture) the
    reference's per-mask phrases equal legion_rt.text.pair_phrases (the runtime's implementation)."""
    from legion_rt.export.reference import ReferencePipeline
    from legion_rt.export.tiny import make_tiny
    from legion_rt.text import pair_phrases

    _, det, prompt, seg, _ = text_tools
    free = make_tiny(tmp_path_factory.mktemp("tiny-free"), seed=0, size="tiny", steer="free")
    pipes = {"loop": tiny_pipelines[0], "free": ReferencePipeline.from_checkpoint(free.checkpoint, free.clip)}
    for name, pipe in pipes.items():
        assert pipe.seg_id == seg and [*pipe.prompt.prefix_ids, *pipe.prompt.suffix_ids] == prompt
        named = 0
        for i, (h, w) in enumerate([(64, 96), (200, 120), (31, 257)]):
            out = pipe.run(_rand_image(h, w, seed=40 + i), max_new_tokens=96, use_kv_cache=True)
            assert out.mask_phrases == pair_phrases(det, prompt, out.token_ids, seg), (name, i)
            assert len(out.mask_phrases) == out.token_ids.count(seg)
            named += sum(p is not None for p in out.mask_phrases)
        assert named > 0, name


def test_run_options(tiny_pipelines):
    pipe = tiny_pipelines[0]
    img = _rand_image(40, 40, seed=11)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(RequestError):
            pipe.run(img, max_new_tokens=bad)
    out = pipe.run(img, max_new_tokens=7, use_kv_cache=True, ignore_eos=True)
    assert len(out.token_ids) == 7
    stages = (
        "preprocess",
        "vision",
        "sam_encoder",
        "prefill",
        "decode",
        "masks",
        "total",
        "time_to_first_token",
    )
    for key in stages:
        assert out.timings[key] >= 0.0, key
    assert out.timings["decode_tokens"] == 6


def test_stops_at_eos_in_both_modes(tiny_pipelines):
    """Greedy decoding stops at the first EOS and keeps it. The tiny model never emits </s> within a few tokens,
    so a copy of the pipeline takes the 4th generated token as its EOS id."""
    import copy

    pipe = tiny_pipelines[0]
    img = _rand_image(30, 45, seed=12)
    free = pipe.run(img, max_new_tokens=12, use_kv_cache=True).token_ids
    stop = copy.copy(pipe)
    stop.eos_id = free[3]
    first = free.index(free[3])
    for kv in (False, True):
        out = stop.run(img, max_new_tokens=12, use_kv_cache=kv)
        assert out.token_ids == free[: first + 1], kv
        forced = stop.run(img, max_new_tokens=12, use_kv_cache=kv, ignore_eos=True)
        assert forced.token_ids == free, kv


def test_mask_upsampling_matches_model_helper():
    from legion_rt.export.model.sam import postprocess_masks_torch

    low = torch.randn(3, 256, 256, generator=torch.Generator().manual_seed(0))
    for resize, orig in [((768, 1024), (480, 640)), ((1024, 341), (1000, 333)), ((10, 1024), (5, 500))]:
        ours = postprocess_masks(low, resize, orig) > 0
        assert torch.equal(ours, postprocess_masks_torch(low, resize, orig))
