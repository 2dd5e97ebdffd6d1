"""The reference pipeline (export/reference.py): preprocessing against transformers / the SAM formulas, and
no-cache decoding (as the original) against KV-cached decoding on tiny random models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="export-stage tests need torch (pip install .[export])")

from export.reference import (  # noqa: E402
    PreprocessConstants,
    clip_preprocess,
    clip_resize_shape,
    load_image,
    reference_postprocess,
    sam_preprocess,
    sam_resize_shape,
)
from legion_rt.errors import ImageError, RequestError  # noqa: E402

# Odd sizes: 1- and 3-pixel-tall pictures (transformers' channels-first guess), 4-tall (5.x also guesses there),
# off-by-one squares, very wide/tall, exact 336 and exact 1024.
ODD_SIZES = [(1, 7), (3, 500), (4, 4), (337, 336), (336, 337), (480, 640), (641, 479), (1000, 333), (50, 2000),
             (336, 336), (1024, 700), (1500, 1024)]


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
    decoded = ("<s> A chat ... USER: The <im_start> <im_end> provides ...\nPlease ... ASSISTANT: The <p> red  hand"
               " </p> [SEG] has six fingers.\n<p> 'sky' </p> [SEG]'</s>")
    text, explanation, phrases = reference_postprocess(decoded)
    assert text == "The <p> red hand </p> [SEG] has six fingers.<p> 'sky' </p> [SEG]'</s>"
    assert phrases == ["red hand", "'sky'"]
    assert explanation == "The red hand has six fingers. 'sky'"
