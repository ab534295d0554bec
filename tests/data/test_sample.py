"""The built-in sample: CIFAKE layout and names, byte-identical on every CPU, learnable but not by a global
statistic, and with a cue that a simple classifier keeps provably under an 8/255 attack."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline import config
from pipeline.data import bounds, sample

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


# sha256 over (relative path, bytes) of every file of GOLDEN at seed 0. It changes only when the generator does:
# then regenerate it with `python -c "from tests.data.test_sample import golden_hash; print(golden_hash())"` and
# say why in the commit. Measured identical under every OpenBLAS kernel and numpy SIMD setting in GOLDEN_ENVIRONMENTS.
GOLDEN = config.Sample(train_per_class=10, test_per_class=4, jpeg_quality=95, mark=12.0)
GOLDEN_SHA256 = "cc0f60a321c37ef8efd206d850c0149c9103c72d50e4f1541c1d6a999fe4a7bc"
# Other CPUs, emulated on this one: OpenBLAS's kernels for other microarchitectures sum in other orders, and numpy's
# AVX-512 loops can be switched off. A float32 generator gave different files under these.
GOLDEN_ENVIRONMENTS = [
    {"OPENBLAS_CORETYPE": "SkylakeX"},
    {"OPENBLAS_CORETYPE": "Prescott"},
    {"NPY_DISABLE_CPU_FEATURES": "AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR"},
]


def golden_hash(root: Path | None = None) -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "raw"
        if root is None:
            sample.write_sample(out, GOLDEN, seed=0, progress=False)
            root = out
        h = hashlib.sha256()
        for path in sorted(root.rglob("*.jpg")):
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
        return h.hexdigest()


def test_golden_hash() -> None:
    assert golden_hash() == GOLDEN_SHA256


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


@pytest.mark.parametrize("env", GOLDEN_ENVIRONMENTS, ids=lambda e: next(f"{k}={v.split()[0]}" for k, v in e.items()))
def test_golden_hash_under_other_cpu_code_paths(env: dict[str, str]) -> None:
    if env.get("OPENBLAS_CORETYPE") == "SkylakeX" and "avx512f" not in cpu_flags():
        pytest.skip("OpenBLAS's SkylakeX kernels need AVX-512, which this CPU lacks (they die of SIGILL)")
    code = "from tests.data.test_sample import golden_hash; print(golden_hash())"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                         text=True, env={**os.environ, **env}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == GOLDEN_SHA256


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

    def laplacian_energy(x: np.ndarray) -> np.ndarray:
        return sample.fingerprint_features(x)[:, :1]

    learned, global_stats, laplacian = (accuracy(f) for f in (sample.fingerprint_features, mean_std, laplacian_energy))
    assert learned >= 0.70, learned
    assert global_stats <= 0.62, global_stats
    assert laplacian <= 0.62, laplacian  # the two phase marks have the same energy
    assert learned - global_stats >= 0.15
    # The robust cue: the reference classifier is right with a margin above 8/255 on (nearly) every image, so no
    # attack within 8/255 can flip it; at 16/255, beyond the mark, nothing is certified.
    assert bounds.certified_accuracy(xte, yte, 8.0) >= 0.99
    assert bounds.certified_accuracy(xte, yte, 16.0) < 0.05


def test_mark_score_moves_at_most_epsilon_under_any_linf_change() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (64, 32, 32, 3))
    delta = rng.choice([-8.0, 8.0], x.shape)
    assert np.abs(bounds.mark_score(x + delta) - bounds.mark_score(x)).max() <= 8.0 + 1e-9
    worst = -8.0 * sample.CHECKERBOARD  # the attack aimed at the mark itself reaches the bound
    assert np.allclose(bounds.mark_score(x + worst) - bounds.mark_score(x), -8.0)


def test_mark_has_the_class_sign_and_never_clips() -> None:
    x = np.full((2, 32, 32, 3), 255.0)
    x[1] = 0.0
    for label, sign in ((1, 1.0), (0, -1.0)):
        marked = sample.add_mark(x, label, 12.0, 12.0)
        assert marked.min() >= 0.0 and marked.max() <= 255.0
        assert np.allclose(bounds.mark_score(marked), sign * 12.0)


def test_decoder_is_fitted_to_real_crops() -> None:
    # The fitted upsampler must restore a real crop from its latent better than plain pixel repetition does;
    # otherwise the fakes would be blurry blobs that brightness statistics separate.
    cropper = sample.Cropper([sample.load_photo(p) for p in sample.TRAIN_PHOTOS])
    rng = np.random.default_rng(0)
    decoder = sample.Decoder.fit(cropper.sample(rng, 256))
    x = cropper.sample(rng, 256)
    z = sample.encode(x)
    fitted = np.mean((x - decoder.decode(z)) ** 2)
    repeated = np.mean((x - z.repeat(2, 1).repeat(2, 2)) ** 2)
    assert fitted < 0.9 * repeated
    fake = decoder.generate(rng, x)
    assert abs(fake.mean() - x.mean()) < 2.0  # brightness is kept: a global mean is no tell


def test_bounds_follow_the_cues_an_attack_can_move() -> None:
    # Flat grey images with known cues: what the proof says can be counted by hand.
    grey = np.full((1, 32, 32, 3), 128.0)

    def image(label: int, mark: float, lines: float = 0.0) -> np.ndarray:
        return sample.add_mark(grey, label, mark, 20.0, lines)

    # A FAKE and a REAL marked 3.5 and 4.4 (lines 0): 7.9 apart in cue space. An attack of 3 can flip neither
    # mark; one of 4 meets them in the middle (4 + 4 >= 7.9), so no detector keeps both, though the REAL one's
    # mark still holds.
    x = np.concatenate([image(1, 3.5), image(0, 4.4)])
    y = np.array([1, 0])
    assert bounds.robustness_bounds(x, y, 3.0) == {"epsilon": 3.0, "lower": 1.0, "upper": 1.0}
    assert bounds.robustness_bounds(x, y, 4.0) == {"epsilon": 4.0, "lower": 0.5, "upper": 0.5}
    # A FAKE with the REAL phase but FAKE lines, beside a REAL with both REAL cues: the lines tell them apart
    # (8 apart), until an attack of more than 4 moves the lines halfway each.
    x = np.concatenate([image(1, -12.0, 4.0), image(0, 12.0, 4.0)])
    assert bounds.robustness_bounds(x, y, 3.9)["upper"] == 1.0
    assert bounds.robustness_bounds(x, y, 4.1) == {"epsilon": 4.1, "lower": 0.5, "upper": 0.5}  # the mark rule
    # is certainly wrong on the FAKE


def test_mark_tiers_give_each_class_its_shares() -> None:
    tiers = config.Sample(train_per_class=1, test_per_class=1, jpeg_quality=95, mark=[
        {"amplitude": [2, 6], "real": 0.1, "fake": 0.3}, {"amplitude": [12, 12], "real": 0.9, "fake": 0.7}]).mark
    rng = np.random.default_rng(0)
    for label, weak in ((0, 10), (1, 30)):
        a = sample.mark_amplitudes(rng, 100, tiers, label)
        assert ((a >= 2) & (a <= 6)).sum() == weak and (a == 12).sum() == 100 - weak


def test_conflicting_pairs_are_found_block_by_block_as_in_the_whole_table() -> None:
    # At CIFAKE size the whole fake x real table is gigabytes: the blocks must find exactly its pairs.
    rng = np.random.default_rng(0)
    fake, real = rng.normal(0, 6, (37, 2)), rng.normal(3, 6, (29, 2))
    whole = np.nonzero(np.abs(fake[:, None] - real[None]).sum(-1) <= 2 * 4.0)
    for block in (1, 29, 100, 1 << 22):  # a row at a time, one row exactly, several rows, everything at once
        f, r = bounds._conflicts(fake, real, 4.0, block)
        assert np.array_equal(f, whole[0]) and np.array_equal(r, whole[1]), block
    assert len(whole[0]) > 0
