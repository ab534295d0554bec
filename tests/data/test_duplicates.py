"""Near-duplicates across splits (pipeline.data.duplicates, preprocess.duplicates): planted exact, re-encoded and
mirrored
copies are found, distinct images are not, and `drop` removes the leaked images from the training side only."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import config
from pipeline.data import duplicates, preprocess, splits


def textured(n: int, seed: int) -> np.ndarray:
    """Distinct photo-like 32x32 images: smooth random shapes at several scales plus fine grain."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 32, 32, 3), np.float32)
    for size, amp in ((4, 50.0), (8, 25.0), (16, 12.0)):
        coarse = rng.normal(0, amp, (n, size, size, 3)).astype(np.float32)
        out += np.stack([np.asarray(Image.fromarray(c[..., k]).resize((32, 32), Image.BICUBIC))
                         for c in coarse for k in range(3)]).reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)
    out += rng.normal(0, 4, out.shape)
    return np.clip(out + 128, 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def test_planted_copies_are_found_and_distinct_images_are_not() -> None:
    reference = textured(300, seed=0)
    planted = {
        "exact": reference[:20],
        "jpeg 90": np.stack([jpeg(x, 90) for x in reference[20:40]]),
        "mirrored": reference[40:60, :, ::-1],
        "mirrored, jpeg 75": np.stack([jpeg(np.ascontiguousarray(x[:, ::-1]), 75) for x in reference[60:80]]),
        "brighter by 12": np.clip(reference[80:100].astype(int) + 12, 0, 255).astype(np.uint8),
    }
    distinct = textured(300, seed=1)
    for kind, (start, copies) in zip(planted, enumerate(planted.values())):
        m = duplicates.find(copies, reference, 0.99)
        assert m.query.tolist() == list(range(20)), kind  # every planted copy found...
        assert (m.reference == np.arange(20) + 20 * start).all(), kind  # ...with the image it copies
    assert len(duplicates.find(distinct, reference, 0.99).query) == 0


def test_flat_images_match_only_exact_copies() -> None:
    flat = np.stack([np.full((32, 32, 3), v, np.uint8) for v in (10, 100, 200)])
    nearly = flat.copy()
    nearly[:, 0, 0] += 3  # one pixel off: unrelated sky patches must not all match each other
    assert duplicates.find(flat[:2], flat[1:], 0.99).query.tolist() == [1]  # the exact copy of 100
    assert len(duplicates.find(nearly, flat, 0.99).query) == 0


def write_raw(root: Path, train: np.ndarray, test: np.ndarray) -> None:
    for split, x in (("train", train), ("test", test)):
        for i, img in enumerate(x):
            cls = "FAKE" if i % 2 else "REAL"
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i:04d}.png")


@pytest.mark.parametrize("action", ["report", "drop"])
def test_preprocess_reports_and_drops_planted_leaks(tmp_path: Path, action: str) -> None:
    train, test = textured(60, seed=2), textured(20, seed=3)
    test[:3] = train[:3]  # exact copies
    test[3] = jpeg(train[3], 90)
    test[4] = train[4, :, ::-1]  # mirrored
    write_raw(tmp_path / "raw", train, test)
    cfg = config.Preprocess(val_fraction=0.2, resize="resize", max_bad_fraction=0.0, max_pixels=4096,
                            duplicates=action, duplicate_similarity=0.99)
    report = preprocess.preprocess(tmp_path / "raw", tmp_path / "out", cfg, seed=0, progress=False)
    leaks = report["near_duplicates"]
    # the five leaked train images sit in train or val, depending on the seeded split; none in test twice
    assert leaks["train_in_test"] + leaks["val_in_test"] == 5
    assert leaks["train_in_val"] == 0
    test_names = splits.load_split(tmp_path / "out", "test").names
    assert len(test_names) == 20  # test is never touched
    kept = {s: splits.load_split(tmp_path / "out", s) for s in ("train", "val")}
    leaked = {f"{'FAKE' if i % 2 else 'REAL'}/{i:04d}.png" for i in range(5)}
    left = leaked & (set(kept["train"].names) | set(kept["val"].names))
    if action == "report":
        assert left == leaked and sum(len(s) for s in kept.values()) == 60
    else:
        assert left == set() and sum(len(s) for s in kept.values()) == 55
        assert leaks["dropped"]["train"] + leaks["dropped"]["val"] == 5
        counts = report["counts"]
        assert sum(counts["train"].values()) + sum(counts["val"].values()) == 55
        for s in kept.values():  # arrays, labels and names stay aligned after the drop
            assert len(s.x) == len(s.y) == len(s.names)
            assert [n.startswith("FAKE/") for n in s.names] == (s.y == 1).tolist()
    assert json.dumps(report)  # the report stays JSON
