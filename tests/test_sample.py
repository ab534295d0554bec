"""The built-in sample: CIFAKE layout and names, deterministic, learnable but not by a global statistic."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline import config, sample

SMALL = config.Sample(train_per_class=12, test_per_class=5, jpeg_quality=95)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("sample") / "raw"
    return out, sample.write_sample(out, SMALL, seed=0, progress=False)


def read_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for label, cls in enumerate(sample.CLASSES):
        for path in sorted((root / split / cls).iterdir()):
            with Image.open(path) as im:
                xs.append(np.asarray(im))
            ys.append(label)
    return np.stack(xs), np.array(ys)


def test_cifake_names() -> None:
    names = [sample.cifake_name(n) for n in (0, 1, 9, 10, 11, 123)]
    assert names == ["0000.jpg", "0000 (2).jpg", "0000 (10).jpg", "0001.jpg", "0001 (2).jpg", "0012 (4).jpg"]


def test_layout_counts_and_format(small: tuple[Path, dict[str, int]]) -> None:
    root, counts = small
    expected = {"train/REAL": 12, "train/FAKE": 12, "test/REAL": 5, "test/FAKE": 5}
    assert counts == expected
    assert sorted(p.name for p in root.iterdir()) == ["test", "train"]
    for folder, n in expected.items():
        files = sorted((root / folder).iterdir())
        assert {p.name for p in files} == {sample.cifake_name(i) for i in range(n)}
        for path in files:
            with Image.open(path) as im:
                assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (32, 32))


def test_same_seed_same_bytes_other_seed_differs(small: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    root, _ = small
    again, other = tmp_path / "again", tmp_path / "other"
    sample.fitted_decoder.cache_clear()  # refit: the fit itself must be deterministic too
    sample.write_sample(again, SMALL, seed=0, progress=False)
    sample.write_sample(other, SMALL, seed=1, progress=False)
    for path in sorted(root.rglob("*.jpg")):
        rel = path.relative_to(root)
        assert (again / rel).read_bytes() == path.read_bytes(), rel
    for folder in ("train/REAL", "train/FAKE", "test/REAL", "test/FAKE"):
        first = sorted((root / folder).iterdir())[0]
        assert (other / folder / first.name).read_bytes() != first.read_bytes(), folder


def test_fakes_are_learnable_but_not_by_global_statistics(tmp_path: Path) -> None:
    # 200+200 train / 100+100 test takes ~2 s. Measured at this size over seeds 0-4: fingerprint features 0.77-0.84,
    # mean/std 0.46-0.56 (the test split's photographs are never seen in training).
    cfg = config.Sample(train_per_class=200, test_per_class=100, jpeg_quality=95)
    sample.write_sample(tmp_path, cfg, seed=0, progress=False)
    (xtr, ytr), (xte, yte) = read_split(tmp_path, "train"), read_split(tmp_path, "test")

    def accuracy(features) -> float:
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
        return model.fit(features(xtr), ytr).score(features(xte), yte)

    def mean_std(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32)
        return np.concatenate([x.mean((1, 2)), x.std((1, 2))], axis=1)

    learned, global_stats = accuracy(sample.fingerprint_features), accuracy(mean_std)
    assert learned >= 0.70, learned
    assert global_stats <= 0.62, global_stats
    assert learned - global_stats >= 0.15


def test_decoder_is_fitted_to_real_crops() -> None:
    # The fitted upsampler must restore a real crop from its latent better than plain pixel repetition does;
    # otherwise the fakes would be blurry blobs that brightness statistics separate.
    cropper = sample.Cropper([sample.load_photo(p) for p in sample.TRAIN_PHOTOS])
    rng = np.random.default_rng(0)
    decoder = sample.Decoder.fit(cropper.sample(rng, 256), rng)
    x = cropper.sample(rng, 256)
    z = sample.encode(x)
    fitted = np.mean((x - decoder.decode(z)) ** 2)
    repeated = np.mean((x - z.repeat(2, 1).repeat(2, 2)) ** 2)
    assert fitted < 0.9 * repeated
    fake = decoder.generate(rng, x)
    assert abs(fake.mean() - x.mean()) < 2.0  # brightness is kept: a global mean is no tell
