"""Safe decoding of one image file into a ``size×size×3`` RGB uint8 array.

Shared by the preprocess stage and the predict tool, so both see pixels made the same way. Anything that cannot
be used (empty, truncated, corrupt, not an image, too big, wrong size under ``skip``) raises :class:`BadImage`
with a short reason; callers skip and report such files instead of crashing.

Policies, chosen once here:
- Transparency is composited on **white** (what viewers and browsers show), so fully transparent pixels do not
  leak whatever colour happens to be stored under them.
- 16-bit data (``I;16*``, and ``I`` which Pillow uses for 16-bit sources) is scaled ``v * 255 / 65535`` rounded,
  not clipped; ``F`` follows Pillow's own convention of 8-bit scale (clip to 0..255).
- Shrinking uses LANCZOS: the sharpest antialiasing filter Pillow has, keeping the fine texture a fake detector
  looks at without aliasing. Enlarging uses BICUBIC: smooth, with less overshoot/ringing than LANCZOS when
  magnifying. Large JPEGs are first decoded at a reduced DCT scale (``draft``), never below 2×``size``.
- EXIF orientation is applied (phone photos store rotation there), before cropping.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
# Only these decoders may run: Image.open would otherwise try every plugin (EPS even starts Ghostscript).
FORMATS = ("JPEG", "PNG", "WEBP", "BMP")  # a multi-picture JPEG opens via "JPEG" with format "MPO"
# Leading bytes of the FORMATS; tells "truncated/corrupt header" apart from "not an image at all".
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF", b"BM")
RESIZE_POLICIES = ("resize", "center_crop", "skip")
ResizePolicy = Literal["resize", "center_crop", "skip"]
DEFAULT_MAX_PIXELS = 4096 * 4096  # same default as params.yaml preprocess.max_pixels
WHITE = (255, 255, 255, 255)


class BadImage(Exception):
    """A file that cannot be used. ``kind`` is a stable category ("truncated", "too big"...) for counting."""

    def __init__(self, kind: str, detail: str = "") -> None:
        self.kind = kind
        self.detail = detail
        super().__init__(f"{kind}: {detail}" if detail else kind)

    @property
    def reason(self) -> str:
        return str(self)

    def __reduce__(self) -> tuple:  # keep kind/detail across processes (the default pickles only the message)
        return (BadImage, (self.kind, self.detail))


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # uint8 size×size×3
    mode: str  # Pillow mode of the source ("RGB", "L", "I;16", ...)
    source_size: tuple[int, int]  # (width, height) from the file header

    @property
    def converted(self) -> bool:
        return self.mode != "RGB"

    @property
    def resized(self) -> bool:
        h, w = self.pixels.shape[:2]
        return self.source_size != (w, h)


def is_image_name(path: Path | str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES


def _open_source(source: Path | str | bytes) -> BinaryIO:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise BadImage("empty file")
        return io.BytesIO(source)
    try:
        fp = open(source, "rb")  # noqa: SIM115 (closed by the caller's with-block)
    except OSError as err:
        raise BadImage("unreadable", err.strerror or type(err).__name__) from None
    if os.fstat(fp.fileno()).st_size == 0:
        fp.close()
        raise BadImage("empty file")
    return fp


def _reason(err: Exception, fp: BinaryIO) -> BadImage:
    """Map Pillow's zoo of decoder exceptions to one short reason."""
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return BadImage("too big", msg)
    if "truncated" in msg.lower():
        return BadImage("truncated", msg)
    if isinstance(err, UnidentifiedImageError):
        fp.seek(0)
        head = fp.read(12)
        if head.startswith(_SIGNATURES):
            return BadImage("corrupt", "header of a known format cannot be parsed (truncated?)")
        return BadImage("not an image", "cannot identify image file (JPEG, PNG, WebP, BMP are read)")
    return BadImage("corrupt", f"{type(err).__name__}: {msg}"[:200])


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB (policies in the module docstring)."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        # Round to nearest: 65535 -> 255, 257 -> 1; clipping would map everything above 255 to white.
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, WHITE), rgba).convert("RGB")
    if mode == "RGB":
        return img
    try:
        return img.convert("RGB")  # L, P, 1 (0/255), CMYK, YCbCr, ...
    except ValueError:
        raise BadImage("unsupported mode", mode) from None


def _fit(img: Image.Image, size: int, policy: ResizePolicy) -> Image.Image:
    w, h = img.size
    if (w, h) == (size, size):
        return img
    if policy == "skip":
        raise BadImage("wrong size", f"{w}x{h}, expected {size}x{size}")
    box = None
    if policy == "center_crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        box = (left, top, left + side, top + side)
        w = h = side
    resample = Image.Resampling.LANCZOS if max(w, h) > size else Image.Resampling.BICUBIC
    # reducing_gap: box-reduce first to >= 3×size, then LANCZOS; much faster on photos, same look at 32×32.
    return img.resize((size, size), resample, box=box, reducing_gap=3.0)


def decode_with_info(
    source: Path | str | bytes,
    size: int = 32,
    resize: ResizePolicy = "resize",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Decoded:
    """Decode one image (a path or its bytes) to RGB uint8 ``size×size×3``, plus what it was before.

    Raises :class:`BadImage` for anything unusable. Images over ``max_pixels`` are refused from the header alone,
    before any pixel is decoded; Pillow's own bomb warning is an error here too (it fires above
    ``Image.MAX_IMAGE_PIXELS``, so that is a ceiling on ``max_pixels``).
    """
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {resize!r}")
    fp = _open_source(source)
    # catch_warnings is cheap; it restores the global filters on exit, so nothing leaks to other code.
    with fp, warnings.catch_warnings(action="error", category=Image.DecompressionBombWarning):
        try:
            img = Image.open(fp, formats=FORMATS)
        except Exception as err:  # Pillow raises many types on malformed headers
            raise _reason(err, fp) from None
        with img:
            w, h = img.size
            if w * h > max_pixels:
                raise BadImage("too big", f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
            if resize == "skip" and (w, h) != (size, size):  # no need to decode what will be refused
                raise BadImage("wrong size", f"{w}x{h}, expected {size}x{size}")
            mode = img.mode
            try:
                if img.format in ("JPEG", "MPO") and min(w, h) >= 4 * size:
                    img.draft(None, (2 * size, 2 * size))  # DCT-domain downscale: big photos decode 4-64× less
                img.load()  # full decode now, so truncated data fails here and not later
                if img.mode == "RGB" and img.size == (size, size) and "exif" not in img.info:
                    return Decoded(np.asarray(img), mode, (w, h))  # fast path: CIFAKE's own files
                if "exif" in img.info:
                    img = ImageOps.exif_transpose(img)
                out = _fit(to_rgb(img), size, resize)
                pixels = np.asarray(out)
            except BadImage:
                raise
            except MemoryError:
                raise
            except Exception as err:
                raise _reason(err, fp) from None
    return Decoded(pixels, mode, (w, h))


def decode(
    source: Path | str | bytes,
    size: int = 32,
    resize: ResizePolicy = "resize",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode one image to a read-only RGB uint8 ``size×size×3`` array; see :func:`decode_with_info`."""
    return decode_with_info(source, size, resize, max_pixels).pixels
