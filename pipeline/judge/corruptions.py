"""What a deployed detector meets without an attacker: images re-saved as JPEG, resized, blurred and made noisy on
their way to it. CIFAKE-style detectors are known to lean on JPEG traces ("Fake or JPEG?", arXiv 2403.17608), so a
re-save alone can move the score. Each corruption maps uint8 N×H×W×3 images to uint8 images of the same shape,
deterministically (noise is seeded)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from pipeline import config


def _per_image(x: np.ndarray, fn) -> np.ndarray:
    return np.stack([np.asarray(fn(Image.fromarray(np.ascontiguousarray(img))).convert("RGB")) for img in x])


def _jpeg(quality: int):
    def resave(img: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        return Image.open(buf)
    return resave


def apply(x: np.ndarray, corruption: config.Corruption, seed: int = 0) -> np.ndarray:
    """``x`` corrupted by ``corruption``: jpeg (amount = quality), downscale (by amount, bilinear, and back up),
    blur (Gaussian, sigma = amount pixels) or noise (Gaussian, sigma = amount/255, rounded back to 8 bits)."""
    kind, amount = corruption.kind, corruption.amount
    if kind == "jpeg":
        return _per_image(x, _jpeg(int(amount)))
    if kind == "downscale":
        h, w = x.shape[1:3]
        small = (max(1, round(w / amount)), max(1, round(h / amount)))
        return _per_image(x, lambda img: img.resize(small, Image.BILINEAR).resize((w, h), Image.BILINEAR))
    if kind == "blur":
        return _per_image(x, lambda img: img.filter(ImageFilter.GaussianBlur(radius=amount)))
    noise = np.random.default_rng(seed).normal(0.0, amount, x.shape)
    return np.clip(np.rint(x.astype(np.float64) + noise), 0, 255).astype(np.uint8)
