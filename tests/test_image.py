"""legion_rt.image against the reference decoder, cv2.imread(path) + BGR->RGB, on generated pictures of every kind."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from legion_rt.errors import ImageError
from legion_rt.image import load_image

cv2 = pytest.importorskip("cv2", reason="opencv-python-headless (test extra) is the reference decoder")

H, W = 37, 53  # odd sizes on purpose


def _cv(path) -> np.ndarray:
    a = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert a is not None, f"cv2 could not read {path}"
    return np.ascontiguousarray(a[:, :, ::-1])


def _rng(seed=0):
    return np.random.default_rng(seed)


def _smooth_rgb(h=H, w=W, seed=0) -> np.ndarray:
    # A smooth picture + a little noise: JPEG-friendly like a photo, still exercising every value range.
    y, x = np.mgrid[0:h, 0:w]
    rng = _rng(seed)
    base = np.stack([128 + 100 * np.sin(x / 7.0 + k) * np.cos(y / 5.0 - k) for k in range(3)], axis=2)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def _png(w: int, h: int, color_type: int, bit_depth: int, rows: list[bytes]) -> bytes:
    """A minimal PNG written by hand (for pixel layouts Pillow cannot write, e.g. 16-bit gray+alpha)."""

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + r for r in rows)
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def _write_cases(tmp_path):
    """name -> path of a picture, written by Pillow, OpenCV or by hand."""
    rng = _rng(1)
    rgb = _smooth_rgb()
    cases = {}

    def pil(name, img, **kw):
        p = tmp_path / name
        img.save(p, **kw)
        cases[name] = p

    pil("rgb.png", Image.fromarray(rgb))
    pil("rgb.jpg", Image.fromarray(rgb), quality=90)
    pil("rgb420.jpg", Image.fromarray(rgb), quality=75, subsampling=2)
    pil("progressive.jpg", Image.fromarray(rgb), quality=85, progressive=True)
    pil("gray.png", Image.fromarray(rgb[:, :, 0]))
    pil("gray.jpg", Image.fromarray(rgb[:, :, 1]), quality=90)
    pil("bilevel.png", Image.fromarray(rgb[:, :, 0] > 128))
    alpha = (rng.random((H, W, 1)) * 255).astype(np.uint8)
    pil("rgba.png", Image.fromarray(np.concatenate([rgb, alpha], 2), "RGBA"))
    pil("la.png", Image.fromarray(np.concatenate([rgb[:, :, :1], alpha], 2), "LA"))
    pal = Image.fromarray(rgb).quantize(16)
    pil("palette.png", pal)
    pil("palette_trns.png", pal, transparency=3)
    pil("palette.gif", pal)
    pil("rgb.bmp", Image.fromarray(rgb))
    pil("rgb.webp", Image.fromarray(rgb), lossless=True)
    pil("rgb.tif", Image.fromarray(rgb))
    cmyk = (rng.random((H, W, 4)) * 255).astype(np.uint8)
    pil("cmyk.jpg", Image.fromarray(cmyk, "CMYK"), quality=95)
    for o in range(1, 9):
        ex = Image.Exif()
        ex[0x0112] = o
        pil(f"exif{o}.jpg", Image.fromarray(rgb), exif=ex, quality=92)
        pil(f"exif{o}.png", Image.fromarray(rgb), exif=ex)
    # 16-bit pictures written by OpenCV (BGR order) and by hand.
    rgb16 = (rng.random((H, W, 3)) * 65535).astype(np.uint16)
    g16 = (rng.random((H, W)) * 65535).astype(np.uint16)
    rgba16 = (rng.random((H, W, 4)) * 65535).astype(np.uint16)
    for name, arr in [
        ("rgb16.png", rgb16[:, :, ::-1]),
        ("gray16.png", g16),
        ("rgba16.png", rgba16[:, :, [2, 1, 0, 3]]),
        ("gray16.tif", g16),
    ]:
        cv2.imwrite(str(tmp_path / name), np.ascontiguousarray(arr))
        cases[name] = tmp_path / name
    la16 = (rng.random((H, W, 2)) * 65535).astype(np.uint16)
    (tmp_path / "la16.png").write_bytes(
        _png(W, H, 4, 16, [la16[i].astype(">u2").tobytes() for i in range(H)])
    )
    cases["la16.png"] = tmp_path / "la16.png"
    return cases


def test_every_kind_matches_opencv(tmp_path):
    cases = _write_cases(tmp_path)
    for name, path in cases.items():
        ref = _cv(path)
        got = load_image(path)
        assert got.dtype == np.uint8 and got.flags.c_contiguous and got.ndim == 3 and got.shape[2] == 3, name
        assert got.shape == ref.shape, (name, got.shape, ref.shape)
        diff = int(np.abs(got.astype(int) - ref.astype(int)).max())
        assert diff == 0, f"{name}: max |legion_rt - cv2| = {diff}"
        # bytes and PIL inputs give the same pixels as the path
        assert np.array_equal(load_image(path.read_bytes()), got), name
        with Image.open(path) as im:
            assert np.array_equal(load_image(im), got), name


def test_pillow_plain_convert_would_be_wrong(tmp_path):
    # Guards the test itself: the cases where a naive decoder differs from OpenCV are really exercised.
    cases = _write_cases(tmp_path)
    with Image.open(cases["gray16.png"]) as im:
        assert not np.array_equal(np.asarray(im.convert("RGB")), _cv(cases["gray16.png"]))
    with Image.open(cases["cmyk.jpg"]) as im:
        assert not np.array_equal(np.asarray(im.convert("RGB")), _cv(cases["cmyk.jpg"]))
    with Image.open(cases["exif6.jpg"]) as im:
        assert np.asarray(im).shape != _cv(cases["exif6.jpg"]).shape


def test_16bit_color_tiff_within_one_step(tmp_path):
    # Known, documented difference: OpenCV rounds v/257 for 16-bit colour TIFF; Pillow keeps only the high byte.
    rgb16 = (_rng(3).random((H, W, 3)) * 65535).astype(np.uint16)
    p = tmp_path / "rgb16.tif"
    cv2.imwrite(str(p), np.ascontiguousarray(rgb16[:, :, ::-1]))
    got = load_image(p)
    assert np.array_equal(got, (rgb16 >> 8).astype(np.uint8))
    assert int(np.abs(got.astype(int) - _cv(p).astype(int)).max()) <= 1  # measured: 1


def test_arrays():
    rgb = _smooth_rgb()
    out = load_image(rgb)
    assert np.array_equal(out, rgb)
    gray = rgb[:, :, 0]
    assert np.array_equal(load_image(gray), np.repeat(gray[:, :, None], 3, 2))
    assert load_image(rgb[:, ::2]).flags.c_contiguous  # a strided view is made contiguous
    for bad in [
        rgb.astype(np.float32),
        rgb[:, :, :2],
        np.zeros((0, 5, 3), np.uint8),
        np.zeros((4, 4, 4), np.uint8),
    ]:
        with pytest.raises(ImageError, match="ndarray"):
            load_image(bad)


def test_bad_inputs_name_the_input(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match="nope.jpg"):
        load_image(missing)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty.png.*empty"):
        load_image(empty)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not a picture at all" * 10)
    with pytest.raises(ImageError, match="junk.jpg"):
        load_image(junk)
    buf = io.BytesIO()
    Image.fromarray(_smooth_rgb(200, 300)).save(buf, "JPEG", quality=90)
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="trunc.jpg"):
        load_image(trunc)
    with pytest.raises(ImageError, match="bytes"):
        load_image(buf.getvalue()[:100])
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    zero = tmp_path / "zero.png"
    zero.write_bytes(_png(0, 0, 2, 8, []))
    with pytest.raises(ImageError, match="zero.png"):
        load_image(zero)
    with pytest.raises(ImageError, match="unsupported image input"):
        load_image(12345)


def test_pixel_limit_checked_before_decoding(tmp_path):
    # A 60000 x 60000 PNG header with a tiny (invalid) body: if the limit were checked after decoding, this would
    # fail with a decode error (or allocate 10 GB) instead of naming the pixel count.
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png(60000, 60000, 2, 8, [b"\x00" * 3]))
    with pytest.raises(ImageError, match=r"bomb.png.*limit"):
        load_image(bomb)
    bomb2 = tmp_path / "bomb2.png"  # under Pillow's own bomb limit, over ours
    bomb2.write_bytes(_png(5000, 5000, 2, 8, [b"\x00" * 3]))
    with pytest.raises(
        ImageError, match=r"bomb2.png.*5000x5000 = 25000000 pixels, over the limit of 1000000"
    ):
        load_image(bomb2, max_pixels=1_000_000)
    small = tmp_path / "small.png"
    Image.fromarray(_smooth_rgb(40, 50)).save(small)
    assert load_image(small, max_pixels=2000).shape == (40, 50, 3)
    with pytest.raises(ImageError, match="limit of 1999"):
        load_image(small, max_pixels=1999)
    with pytest.raises(ImageError, match="limit"):
        load_image(_smooth_rgb(40, 50), max_pixels=1999)
