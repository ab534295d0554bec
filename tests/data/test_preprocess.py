"""pipeline.data.preprocess.preprocess and load_split on small synthetic CIFAKE trees."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import config
from pipeline.data import filetree, images, preprocess, splits
from pipeline.errors import DataError

ROOT = Path(__file__).resolve().parents[2]


def cfg(**kw) -> config.Preprocess:
    base = {"val_fraction": 0.2, "resize": "resize", "max_bad_fraction": 0.1, "max_pixels": 4096 * 4096,
            "duplicates": "report", "duplicate_similarity": 0.99}
    return config.Preprocess(**{**base, **kw})


def make_raw(root: Path, train: int = 20, test: int = 5) -> Path:
    """CIFAKE layout; REAL images are dark (value 40 + i), FAKE bright (200 + i), so labels can be checked."""
    for split, n in (("train", train), ("test", test)):
        for cls, base in (("REAL", 40), ("FAKE", 200)):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32), (base + i,) * 3).save(folder / f"0000 ({i + 1}).png")
    return root


def test_arrays_labels_names_and_split(tmp_path: Path) -> None:
    raw, out = make_raw(tmp_path / "raw"), tmp_path / "processed"
    report = preprocess.preprocess(raw, out, cfg(), seed=7, progress=False)
    assert report["counts"] == {"train": {"REAL": 16, "FAKE": 16}, "val": {"REAL": 4, "FAKE": 4},
                                "test": {"REAL": 5, "FAKE": 5}}
    assert report["bad"] == [] and report["bad_fraction"] == 0 and report["images"] == 50
    seen: set[str] = set()
    for name in splits.SPLITS:
        s = splits.load_split(out, name)
        assert isinstance(s.x, np.memmap) and s.x.dtype == np.uint8 and s.x.shape == (len(s), 32, 32, 3)
        assert s.y.dtype == np.uint8 and set(s.y.tolist()) == {0, 1}
        assert all(n.startswith(("REAL/", "FAKE/")) and n.endswith(".png") for n in s.names)
        bright = s.x.reshape(len(s), -1).mean(1) > 128
        assert (bright == (s.y == 1)).all()  # FAKE = 1, and each label sits with its own image
        assert [n.startswith("FAKE/") for n in s.names] == (s.y == 1).tolist()
        if name != "test":
            assert not seen & set(s.names)  # train and val are disjoint
            seen |= set(s.names)
    assert len(seen) == 40  # together they are all of raw/train
    loaded = splits.load_split(out, "train", mmap=False)
    assert not isinstance(loaded.x, np.memmap) and len(loaded) == 32


def test_split_is_deterministic_and_seeded(tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "raw", train=30, test=2)
    names = []
    for run, seed in enumerate((1, 1, 2)):
        preprocess.preprocess(raw, tmp_path / f"out{run}", cfg(val_fraction=0.3), seed=seed, progress=False)
        names.append(splits.load_split(tmp_path / f"out{run}", "val").names)
    a, b = (tmp_path / f"out{i}" / "train" / "x.npy" for i in (0, 1))
    assert a.read_bytes() == b.read_bytes()
    assert names[0] == names[1] and names[0] != names[2]
    assert len(names[0]) == 18 and sum(n.startswith("FAKE/") for n in names[0]) == 9  # 0.3 of 30, per class


def test_stratified_mask_keeps_both_classes_on_both_sides() -> None:
    labels = np.array([0] * 97 + [1] * 3, np.uint8)
    mask = preprocess.stratified_val_mask(labels, 0.2, seed=0)
    assert mask[:97].sum() == 19 and mask[97:].sum() == 1  # round(0.6) = 1, and never all of a class
    with pytest.raises(DataError, match="need at least 2"):
        preprocess.stratified_val_mask(np.array([0, 0, 1], np.uint8), 0.5, seed=0)


def test_bad_files_are_skipped_and_reported(tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "raw", train=20, test=5)
    jpeg = (raw / "train/REAL/0000 (1).png").read_bytes()
    (raw / "train/REAL/empty.jpg").write_bytes(b"")
    (raw / "train/FAKE/cut.png").write_bytes(jpeg[: len(jpeg) // 2])
    (raw / "test/FAKE/notes.txt").write_text("not a picture")
    (raw / "test/REAL/Thumbs.db").write_bytes(b"\0" * 64)
    (raw / "test/REAL/noise.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    Image.new("L", (64, 48), 50).save(raw / "test/REAL/big gray.png")  # good: converted and resized
    report = preprocess.preprocess(raw, tmp_path / "out", cfg(), seed=0, progress=False)
    reasons = {b["file"]: b["reason"] for b in report["bad"]}
    assert set(reasons) == {"train/REAL/empty.jpg", "train/FAKE/cut.png", "test/FAKE/notes.txt",
                            "test/REAL/Thumbs.db", "test/REAL/noise.jpg"}
    assert reasons["train/REAL/empty.jpg"] == "empty file"
    assert reasons["train/FAKE/cut.png"].startswith(("truncated", "corrupt"))
    assert reasons["test/FAKE/notes.txt"].startswith("not an image: suffix '.txt'")
    assert report["bad_fraction"] == pytest.approx(5 / 56, abs=1e-6)
    assert report["converted"] == {"mode L": 1} and report["resized"] == 1
    test = splits.load_split(tmp_path / "out", "test")
    assert len(test) == 11 and "REAL/big gray.png" in test.names
    assert sum(len(splits.load_split(tmp_path / "out", s)) for s in splits.SPLITS) == report["images"] == 51


def test_a_damaged_entry_in_the_raw_zip_is_one_bad_file(tmp_path: Path) -> None:
    from tests.use.test_predict import damage

    raw = make_raw(tmp_path / "raw", train=20, test=5)
    archive = tmp_path / "raw.zip"
    with filetree.writer(archive) as put:
        for path in sorted(raw.rglob("*.png")):
            put(path.relative_to(raw).as_posix(), path.read_bytes())
    damage(archive, (raw / "test/FAKE/0000 (3).png").read_bytes())  # the first entry with these bytes
    report = preprocess.preprocess(archive, tmp_path / "out", cfg(), seed=0, progress=False)
    assert [b["file"] for b in report["bad"]] == ["test/FAKE/0000 (3).png"]
    assert report["bad"][0]["reason"].startswith("unreadable") and report["images"] == 49


def test_too_many_bad_files_fail_and_write_nothing(tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "raw", train=10, test=3)
    for i in range(3):
        (raw / f"test/FAKE/bad{i}.jpg").write_bytes(b"garbage")
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        preprocess.preprocess(raw, out, cfg(max_bad_fraction=0.05), seed=0, progress=False)
    msg = str(err.value)
    assert "3 of 29 files" in msg and "preprocess.max_bad_fraction" in msg and "test/FAKE/bad0.jpg (not an image" in msg
    assert not out.exists() and list(tmp_path.iterdir()) == [raw]  # no output, no temporary leftovers
    # an earlier good output survives a failed rerun untouched
    preprocess.preprocess(raw, out, cfg(max_bad_fraction=0.2), seed=0, progress=False)
    before = (out / "train" / "x.npy").read_bytes()
    with pytest.raises(DataError):
        preprocess.preprocess(raw, out, cfg(max_bad_fraction=0.0), seed=0, progress=False)
    assert (out / "train" / "x.npy").read_bytes() == before


def test_wrong_size_under_skip_counts_as_bad(tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "raw", train=10, test=2)
    Image.new("RGB", (40, 40)).save(raw / "train/REAL/odd.png")
    report = preprocess.preprocess(raw, tmp_path / "out", cfg(resize="skip"), seed=0, progress=False)
    assert report["bad"] == [{"file": "train/REAL/odd.png", "split": report["bad"][0]["split"],
                              "reason": "wrong size: 40x40, expected 32x32"}]
    assert report["bad_by_kind"] == {"wrong size": 1}


def test_missing_class_folder_names_the_layout(tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "raw", train=4, test=2)
    (raw / "test/FAKE").rename(raw / "test/fake_images")
    with pytest.raises(DataError, match=r"test/FAKE.*\{train,test\}/\{REAL,FAKE\}"):
        preprocess.preprocess(raw, tmp_path / "out", cfg(), seed=0, progress=False)


def test_each_file_is_decoded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = make_raw(tmp_path / "raw", train=12, test=3)
    calls: list[str] = []
    real_read, real_decode = filetree.Tree.read, images.decode_with_info

    def reading(tree, name):  # type: ignore[no-untyped-def]
        calls.append(name)
        return real_read(tree, name)

    decoded: list[int] = []

    def decoding(source, *a, **k):  # type: ignore[no-untyped-def]
        decoded.append(1)
        return real_decode(source, *a, **k)

    monkeypatch.setattr(filetree.Tree, "read", reading)
    monkeypatch.setattr(images, "decode_with_info", decoding)
    preprocess.preprocess(raw, tmp_path / "out", cfg(), seed=0, progress=False, workers=1)
    assert len(calls) == len(set(calls)) == len(decoded) == 30


def test_worker_pool_gives_identical_output(tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "raw", train=300, test=10)  # 620 files: more than one chunk of work per split
    (raw / "train/REAL/bad.jpg").write_bytes(b"")
    r1 = preprocess.preprocess(raw, tmp_path / "one", cfg(), seed=3, progress=False, workers=1)
    r2 = preprocess.preprocess(raw, tmp_path / "two", cfg(), seed=3, progress=False, workers=2)
    assert r1 == r2
    for split in splits.SPLITS:
        for f in ("x.npy", "y.npy", "names.json"):
            assert (tmp_path / "one" / split / f).read_bytes() == (tmp_path / "two" / split / f).read_bytes()


def test_load_split_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="run the preprocess stage"):
        splits.load_split(tmp_path, "train")
    folder = tmp_path / "val"
    folder.mkdir()
    np.save(folder / "x.npy", np.zeros((2, 32, 32, 3), np.uint8))
    np.save(folder / "y.npy", np.zeros(3, np.uint8))
    (folder / "names.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(DataError, match="inconsistent"):
        splits.load_split(tmp_path, "val")
    with pytest.raises(ValueError):
        splits.load_split(tmp_path, "validation")


def test_stage_script_writes_report(tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "raw", train=10, test=2)
    (raw / "train/FAKE/junk.txt").write_text("x")
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    proc = subprocess.run(
        [sys.executable, str(ROOT / "src" / "preprocess.py"), "--params", str(params),
         "-S", f"paths.raw={raw}", "-S", f"paths.processed={tmp_path / 'processed'}",
         "-S", f"paths.preprocess_report={tmp_path / 'report.json'}", "-S", "preprocess.max_bad_fraction=0.1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["images"] == 24 and report["bad"][0]["file"] == "train/FAKE/junk.txt"
    assert "test  REAL 2  FAKE 2" in proc.stderr  # the per-split counts are logged
    fail = subprocess.run(
        [sys.executable, str(ROOT / "src" / "preprocess.py"), "--params", str(params), "-S", f"paths.raw={raw}",
         "-S", f"paths.processed={tmp_path / 'p2'}", "-S", "preprocess.max_bad_fraction=0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert fail.returncode == 1 and fail.stderr.startswith("error: 1 of 25 files") and "Traceback" not in fail.stderr
