"""pipeline.data.images: every mode to RGB uint8, size policies, and refusal of bad or dangerous files."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.data import images
from pipeline.data.images import BadImage, decode, decode_with_info


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def rgb_noise(w: int = 32, h: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def check_rgb(a: np.ndarray, size: int = 32) -> None:
    assert a.dtype == np.uint8 and a.shape == (size, size, 3)


def test_rgb_png_is_lossless_and_jpeg_from_path(tmp_path: Path) -> None:
    a = rgb_noise()
    assert np.array_equal(decode(encode(Image.fromarray(a))), a)
    p = tmp_path / "0000 (1).jpg"
    Image.fromarray(a).save(p, quality=95)
    out = decode_with_info(p)
    check_rgb(out.pixels)
    assert out.mode == "RGB" and not out.converted and not out.resized
    with Image.open(p) as ref:  # the fast path is exactly Pillow's own decode
        assert np.array_equal(out.pixels, np.asarray(ref))


def test_grayscale_modes() -> None:
    gray = np.full((32, 32), 77, np.uint8)
    assert (decode(encode(Image.fromarray(gray, "L"))) == 77).all()
    bits = np.zeros((32, 32), bool)
    bits[:, 16:] = True
    out = decode(encode(Image.fromarray(bits).convert("1")))
    assert (out[:, :16] == 0).all() and (out[:, 16:] == 255).all()
    assert decode_with_info(encode(Image.fromarray(bits).convert("1"))).mode == "1"


def test_16bit_png_is_scaled_not_clipped() -> None:
    a = np.zeros((32, 32), np.uint16)
    a[:, :8], a[:, 8:16], a[:, 16:24], a[:, 24:] = 65535, 32768, 257, 0
    data = encode(Image.fromarray(a))
    info = decode_with_info(data)
    assert info.mode.startswith("I;16")
    out = info.pixels
    assert (out[:, :8] == 255).all() and (out[:, 8:16] == 128).all()
    assert (out[:, 16:24] == 1).all() and (out[:, 24:] == 0).all()


def test_int32_and_float_modes() -> None:
    out = np.asarray(images.to_rgb(Image.fromarray(np.full((4, 4), 65535, np.int32), "I")))
    assert (out == 255).all()
    f = np.array([[0.0, 127.6], [300.0, np.nan]], np.float32)
    out = np.asarray(images.to_rgb(Image.fromarray(f, "F")))
    assert out[..., 0].tolist() == [[0, 128], [255, 0]]


def test_alpha_is_composited_on_white() -> None:
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 200  # red hidden under full transparency must not show
    rgba[:16, :, 3] = 255  # top half opaque red-ish, bottom half transparent
    out = decode(encode(Image.fromarray(rgba, "RGBA")))
    assert (out[:16] == [200, 0, 0]).all()
    assert (out[16:] == 255).all()
    la = np.stack([np.full((32, 32), 0, np.uint8), np.full((32, 32), 128, np.uint8)], -1)
    out = decode(encode(Image.fromarray(la, "LA")))
    assert np.abs(out.astype(int) - 127).max() <= 1  # black at half alpha over white


def test_palette_with_and_without_transparency() -> None:
    p = Image.new("P", (32, 32), 0)
    p.putpalette([10, 20, 30, 250, 0, 0] + [0] * 762)
    p.paste(1, (0, 0, 32, 16))
    out = decode(encode(p))
    assert (out[:16] == [250, 0, 0]).all() and (out[16:] == [10, 20, 30]).all()
    out = decode(encode(p, transparency=0))  # palette index 0 transparent -> white
    assert (out[:16] == [250, 0, 0]).all() and (out[16:] == 255).all()
    assert decode_with_info(encode(p, transparency=0)).mode == "P"


def test_cmyk_jpeg() -> None:
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    info = decode_with_info(encode(cmyk, "JPEG", quality=95))
    assert info.mode == "CMYK"
    r, g, b = info.pixels.reshape(-1, 3).mean(0)
    assert r > 200 and g < 50 and b < 50


def test_webp_and_bmp() -> None:
    a = rgb_noise()
    assert np.array_equal(decode(encode(Image.fromarray(a), "BMP")), a)
    check_rgb(decode(encode(Image.fromarray(a), "WEBP", quality=90)))


def test_resize_policies() -> None:
    wide = np.zeros((32, 96, 3), np.uint8)
    wide[:, 32:64] = 255  # white centre square, black left and right
    data = encode(Image.fromarray(wide))
    info = decode_with_info(data, resize="resize")
    check_rgb(info.pixels)
    assert info.resized and info.source_size == (96, 32)
    assert info.pixels[:, :8].max() < 30 and info.pixels[:, 13:19].min() > 225  # squashed: stripes kept
    assert decode(data, resize="center_crop").min() > 250  # only the white centre square remains
    with pytest.raises(BadImage, match="wrong size: 96x32"):
        decode(data, resize="skip")
    small = decode(encode(Image.fromarray(np.full((8, 8, 3), 99, np.uint8))))  # enlarge
    assert (small == 99).all()
    check_rgb(decode(data, size=16), 16)


def test_large_jpeg_uses_reduced_decode() -> None:
    x = np.linspace(0, 255, 1024)
    a = np.broadcast_to(x[None, :, None], (768, 1024, 3)).astype(np.uint8)
    out = decode(encode(Image.fromarray(a), "JPEG", quality=90))
    check_rgb(out)
    assert out[:, 0].mean() < 15 and out[:, -1].mean() > 240 and (np.diff(out[16, :, 0].astype(int)) >= -2).all()


def test_exif_orientation_applied() -> None:
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, :32] = 255  # left half white
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": the white half ends on top
    out = decode(encode(img, "JPEG", quality=95, exif=exif.tobytes()), resize="center_crop")
    assert out[:8].mean() > 200 and out[-8:].mean() < 50


@pytest.mark.parametrize(
    "data, kind",
    [
        (b"", "empty file"),
        (b"just some text, not a picture\n", "not an image"),
        (np.random.default_rng(1).bytes(3000), "not an image"),
    ],
)
def test_unusable_bytes(data: bytes, kind: str) -> None:
    with pytest.raises(BadImage) as err:
        decode(data)
    assert err.value.kind == kind


def test_bad_files_on_disk(tmp_path: Path) -> None:
    jpeg = encode(Image.fromarray(rgb_noise()), "JPEG", quality=95)
    cases = {
        "empty.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "random.jpg": np.random.default_rng(2).bytes(2000),
        "notes.jpg": b"hello\n",
        "gif.png": encode(Image.new("RGB", (32, 32)), "GIF"),  # a real image in a format not read here
    }
    expect = {"empty.jpg": "empty file", "truncated.jpg": "truncated", "random.jpg": "not an image",
              "notes.jpg": "not an image", "gif.png": "not an image"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BadImage) as err:
            decode(tmp_path / name)
        assert err.value.kind == expect[name], (name, str(err.value))
    with pytest.raises(BadImage, match="unreadable"):
        decode(tmp_path / "missing.jpg")


def test_truncated_png_and_corrupt_jpeg() -> None:
    png = encode(Image.fromarray(rgb_noise()))
    with pytest.raises(BadImage) as err:
        decode(png[: len(png) // 2])
    assert err.value.kind == "truncated"
    jpeg = bytearray(encode(Image.fromarray(rgb_noise()), "JPEG", quality=95))
    jpeg[200:600:7] = b"\xff" * len(jpeg[200:600:7])  # stray markers in the entropy-coded data
    with pytest.raises(BadImage) as err:
        decode(bytes(jpeg))
    assert err.value.kind in ("corrupt", "truncated")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width×height and whose pixel data is a few bytes: cheap to make, huge if decoded."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 100)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.format))
    # 5000×5000 = 25 M pixels: over our max_pixels (16.7 M), under Pillow's own limit (89 M): our header check
    with pytest.raises(BadImage, match="too big: 5000x5000"):
        decode(png_header_only(5000, 5000), max_pixels=4096 * 4096)
    # between Pillow's 1× and 2× limit Pillow only warns; the warning is an error here
    with pytest.raises(BadImage) as err:
        decode(png_header_only(10000, 10000), max_pixels=10**10)
    assert err.value.kind == "too big"
    # above 2× Pillow raises DecompressionBombError itself
    with pytest.raises(BadImage) as err:
        decode(png_header_only(20000, 20000))
    assert err.value.kind == "too big"
    assert loads == []  # refused from the header: no pixel data was ever decoded
    monkeypatch.undo()
    with pytest.raises(BadImage, match="too big: 64x64"):
        decode(encode(Image.fromarray(rgb_noise(64, 64))), max_pixels=1000)


def test_bomb_warning_filter_does_not_leak() -> None:
    import warnings

    before = list(warnings.filters)
    with pytest.raises(BadImage):
        decode(png_header_only(10000, 10000), max_pixels=10**10)
    assert warnings.filters == before


def test_bad_image_pickles_with_its_kind() -> None:
    import pickle

    bad = pickle.loads(pickle.dumps(BadImage("truncated", "12 bytes")))
    assert (bad.kind, bad.detail, str(bad)) == ("truncated", "12 bytes", "truncated: 12 bytes")


def test_unknown_policy_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        decode(b"x", resize="stretch")  # type: ignore[arg-type]
