"""pipeline.judge.corruptions: each corruption changes the images as named, deterministically, and keeps shape and type;
evaluate reports them beside the attacks."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import config
from pipeline.judge import corruptions


def images(n: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = rng.integers(40, 215, (n, 8, 8, 3)).repeat(4, axis=1).repeat(4, axis=2)
    return np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)


def c(kind: str, amount: float) -> config.Corruption:
    return config.Corruption(kind=kind, amount=amount)


def high_freq(x: np.ndarray) -> float:
    """Mean absolute difference between neighbouring pixels: what blur and downscaling take away."""
    x = x.astype(float)
    return float(np.abs(np.diff(x, axis=1)).mean() + np.abs(np.diff(x, axis=2)).mean())


@pytest.mark.parametrize("corruption", [c("jpeg", 90), c("jpeg", 50), c("downscale", 2), c("blur", 0.5),
                                        c("blur", 1), c("noise", 2), c("noise", 4)], ids=lambda k: k.describe())
def test_each_changes_the_images_and_keeps_their_form(corruption: config.Corruption) -> None:
    x = images()
    out = corruptions.apply(x, corruption, seed=3)
    assert out.shape == x.shape and out.dtype == np.uint8
    assert (out != x).mean() > 0.2  # really applied
    assert np.array_equal(out, corruptions.apply(x, corruption, seed=3))  # deterministic


def test_strength_orders_the_damage() -> None:
    x = images()

    def err(k):
        return float(np.abs(corruptions.apply(x, k, seed=1).astype(float) - x).mean())

    assert err(c("jpeg", 90)) < err(c("jpeg", 75)) < err(c("jpeg", 50))
    assert err(c("noise", 2)) < err(c("noise", 4))
    assert 1.3 < err(c("noise", 4)) / err(c("noise", 2)) < 2.7  # sigma in 1/255 units, as named
    blurred = [high_freq(corruptions.apply(x, c("blur", sigma))) for sigma in (1, 0.5)]
    assert blurred[0] < blurred[1] < high_freq(x)
    assert high_freq(corruptions.apply(x, c("downscale", 2))) < high_freq(x)


def test_bad_amounts_fail_with_the_reason() -> None:
    with pytest.raises(ValueError, match="quality"):
        c("jpeg", 100)
    with pytest.raises(ValueError, match="factor"):
        c("downscale", 1)
    assert [k.describe() for k in (c("jpeg", 90), c("blur", 0.5), c("noise", 4))] == ["jpeg90", "blur0.5", "noise4"]


def test_downscale_reads_its_factor() -> None:
    # Two factors, two results: a downscale that ignored its factor (or a fixed 2) gives the same images for both.
    x = images()
    halved, quartered = (corruptions.apply(x, c("downscale", f)) for f in (2, 4))
    assert not np.array_equal(halved, quartered)
    assert high_freq(quartered) < high_freq(halved) < high_freq(x)  # the larger factor loses more detail


def test_noise_is_centred_and_clipped_to_the_pixel_range() -> None:
    gray = np.full((4, 32, 32, 3), 128, np.uint8)
    assert abs(corruptions.apply(gray, c("noise", 4)).astype(float).mean() - 128) < 0.2  # zero-mean noise
    ends = np.zeros((4, 32, 32, 3), np.uint8)
    ends[:, :, 16:] = 255
    out = corruptions.apply(ends, c("noise", 4))
    dark, bright = out[ends == 0], out[ends == 255]
    assert dark.max() < 40 and (dark == 0).mean() > 0.4  # clipped at 0, not wrapped round to 255
    assert bright.min() > 215 and (bright == 255).mean() > 0.4  # clipped at 255, not wrapped round to 0


def test_downscale_is_bilinear_down_and_up_per_side() -> None:
    from PIL import Image

    x = images(2)[:, :16]  # 16 rows x 32 columns: the two sides scale apart
    want = [np.asarray(Image.fromarray(img).resize((8, 4), Image.BILINEAR).resize((32, 16), Image.BILINEAR))
            for img in x]
    assert np.array_equal(corruptions.apply(x, c("downscale", 4)), np.stack(want))
    # a factor beyond the image's size leaves one pixel: the image's average colour everywhere
    flat = corruptions.apply(x[:, :4, :8], c("downscale", 16))
    assert (flat == flat[:, :1, :1]).all()


def test_noise_is_seeded_with_zero_by_default() -> None:
    x = images(2)
    assert np.array_equal(corruptions.apply(x, c("noise", 4)), corruptions.apply(x, c("noise", 4), seed=0))
