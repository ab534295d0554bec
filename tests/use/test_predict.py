"""The predict tool: ``src/predict.py --input DIR --output FILE --model PATH|models:/NAME@champion`` on a messy
folder, its CSV contract, skipped files and one-line errors."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from pipeline import config, tracking
from pipeline.judge import registry
from pipeline.model import inference, serving
from pipeline.use import predicting

ROOT = Path(__file__).resolve().parents[2]
HEADER = ["Image Name", "Predicted Label"]
PREPROCESS = config.load(ROOT / "params.yaml").preprocess  # the tool decodes with these by default


def noise(h: int, w: int, low: int, high: int, seed: int, channels: int = 3) -> np.ndarray:
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed).integers(low, high, shape, dtype=np.uint8)


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """Every kind of file a user's folder holds; 6 usable images, 1 corrupt one, 1 non-image."""
    d = tmp_path / "images"
    (d / "nested" / "deeper").mkdir(parents=True)
    Image.fromarray(noise(32, 32, 156, 256, 1)).save(d / "good.jpg", quality=95)
    Image.fromarray(noise(32, 32, 0, 100, 2)).save(d / "UPPER.JPG", quality=95)
    Image.fromarray(noise(32, 32, 0, 100, 3, channels=1), "L").save(d / "gray.png")
    rgba = np.dstack([noise(32, 32, 0, 100, 4), np.full((32, 32), 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    Image.fromarray(noise(40, 50, 156, 256, 5)).save(d / "odd_50x40.png")
    Image.fromarray(noise(32, 32, 156, 256, 6)).save(d / "nested" / "deeper" / "inner.png")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(200))
    (d / "notes.txt").write_text("not an image\n")
    return d


USABLE = ["UPPER.JPG", "good.jpg", "gray.png", "nested/deeper/inner.png", "odd_50x40.png", "rgba.png"]


def run_predict(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "src/predict.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=300)


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_read_folder_decodes_every_usable_image_and_reports_the_rest(messy_folder: Path) -> None:
    found = predicting.read_folder(messy_folder, PREPROCESS.resize, PREPROCESS.max_pixels)
    assert found.names == USABLE  # relative, forward slashes, .JPG included, .txt ignored, sorted
    assert found.x.shape == (6, 32, 32, 3) and found.x.dtype == np.uint8
    assert [name for name, _ in found.bad] == ["corrupt.jpg"]
    gray = found.x[found.names.index("gray.png")]
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])


def test_a_zip_reads_like_the_folder_and_under_picks_a_part(messy_folder: Path, tmp_path: Path) -> None:
    from pipeline.data import filetree

    archive = tmp_path / "images.zip"
    with filetree.writer(archive) as put:
        for path in sorted(messy_folder.rglob("*")):
            if path.is_file():
                put(f"test/{path.relative_to(messy_folder).as_posix()}", path.read_bytes())
    put_aside = predicting.read_folder(messy_folder, PREPROCESS.resize, PREPROCESS.max_pixels)
    from_zip = predicting.read_folder(archive, PREPROCESS.resize, PREPROCESS.max_pixels, under="test")
    assert from_zip.names == put_aside.names and np.array_equal(from_zip.x, put_aside.x)
    assert from_zip.bad == put_aside.bad


def damage(archive: Path, payload: bytes) -> None:
    """Flip a byte inside ``payload``'s stored bytes in ``archive``: reading that entry fails its CRC check."""
    raw = bytearray(archive.read_bytes())
    at = raw.find(payload)
    assert at >= 0, "the entry is not stored as is"
    raw[at + len(payload) // 2] ^= 0xFF
    archive.write_bytes(bytes(raw))


def test_a_damaged_entry_in_a_zip_is_skipped_and_named_not_fatal(messy_folder: Path, tmp_path: Path) -> None:
    from pipeline.data import filetree

    archive = tmp_path / "images.zip"
    with filetree.writer(archive) as put:
        for name in ("good.jpg", "rgba.png"):
            put(name, (messy_folder / name).read_bytes())
    damage(archive, (messy_folder / "rgba.png").read_bytes())
    found = predicting.read_folder(archive, PREPROCESS.resize, PREPROCESS.max_pixels)
    assert found.names == ["good.jpg"] and len(found.x) == 1
    [(name, reason)] = found.bad
    assert name == "rgba.png" and reason.startswith("unreadable") and "CRC" in reason


def test_streaming_in_chunks_writes_what_one_pass_would(messy_folder: Path, tmp_path: Path, tiny_model) -> None:
    seen: list[int] = []

    def predict(x: np.ndarray) -> np.ndarray:
        seen.append(len(x))
        return inference.predict_proba(tiny_model.model, x)

    listing = predicting.list_images(messy_folder)
    done = predicting.predict_to_csv(predict, listing, PREPROCESS.resize, PREPROCESS.max_pixels, 0.5,
                                     tmp_path / "streamed.csv", chunk=2)
    assert max(seen) <= 2 and sum(seen) == len(USABLE)  # never more than one chunk in memory
    found = predicting.read_folder(messy_folder, PREPROCESS.resize, PREPROCESS.max_pixels)
    want = predicting.labels(inference.predict_proba(tiny_model.model, found.x), 0.5)
    assert read_csv(tmp_path / "streamed.csv") == [HEADER, *map(list, zip(USABLE, want))]
    assert done.images == len(USABLE) and done.fake == want.count("Fake")
    assert [name for name, _ in done.skipped] == ["corrupt.jpg"]


def test_predict_cli_writes_the_csv_contract(messy_folder: Path, tmp_path: Path, tiny_model, tiny_model_file) -> None:
    out = tmp_path / "out" / "predictions.csv"
    proc = run_predict("--input", str(messy_folder), "--output", str(out), "--model", str(tiny_model_file))
    assert proc.returncode == 0, proc.stderr
    rows = read_csv(out)
    assert rows[0] == HEADER
    body = rows[1:]
    assert [name for name, _ in body] == USABLE
    assert all(label in ("Real", "Fake") for _, label in body)
    assert all(len(row) == 2 for row in body)
    assert "corrupt.jpg" in proc.stderr and "corrupt.jpg" not in out.read_text()
    assert "notes.txt" not in out.read_text() and "\\" not in out.read_text()
    # the tool says what the library says
    found = predicting.read_folder(messy_folder, PREPROCESS.resize, PREPROCESS.max_pixels)
    want = predicting.labels(inference.predict_proba(tiny_model.model, found.x), 0.5)
    assert [label for _, label in body] == want
    assert dict(body)["good.jpg"] == "Fake" and dict(body)["UPPER.JPG"] == "Real"  # bright vs dark, as trained


def test_empty_folder_is_a_one_line_error(tmp_path: Path, tiny_model_file) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here\n")
    out = tmp_path / "out.csv"
    proc = run_predict("--input", str(empty), "--output", str(out), "--model", str(tiny_model_file))
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "no images" in lines[0] and str(empty) in lines[0]
    assert "Traceback" not in proc.stderr and not out.exists()


def test_missing_model_is_a_one_line_error(messy_folder: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model.keras"
    proc = run_predict("--input", str(messy_folder), "--output", str(tmp_path / "out.csv"), "--model", str(missing))
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and str(missing) in lines[0] and "--model" in lines[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out.csv").exists()


def test_predict_from_the_registry_champion(messy_folder: Path, tmp_path: Path, params, mlflow_store,
                                            small_model_file) -> None:
    from pipeline.model import serving, store

    tracking.setup(params.mlflow)
    with mlflow.start_run():  # a small model: a ResNet50 is ~100 MB to log and tens of seconds to load
        info = serving.log_version(small_model_file, serving.settings(0.5, PREPROCESS), "model", "cifake-test")
    MlflowClient().set_registered_model_alias("cifake-test", registry.CHAMPION, info["version"])

    out = tmp_path / "registry.csv"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store.uri}
    proc = run_predict("--input", str(messy_folder), "--output", str(out), "--model", "models:/cifake-test@champion",
                       env=env)
    assert proc.returncode == 0, proc.stderr
    rows = read_csv(out)
    found = predicting.read_folder(messy_folder, PREPROCESS.resize, PREPROCESS.max_pixels)
    want = predicting.labels(inference.predict_proba(store.load(small_model_file), found.x), 0.5)
    assert rows == [HEADER, *map(list, zip(USABLE, want))]


def test_the_threshold_stored_beside_the_model_is_used_unless_overridden(tmp_path: Path,
                                                                         small_model_file: Path) -> None:
    from pipeline.model import store
    from tests.conftest import model_with_stored_threshold

    case = model_with_stored_threshold(tmp_path, store.load(small_model_file), small_model_file)
    assert serving.load_with_threshold(str(case.model))[1] == case.threshold
    for threshold, extra in ((case.threshold, []), (0.5, ["--threshold", "0.5"])):
        out = tmp_path / f"{threshold}.csv"
        proc = run_predict("--input", str(case.folder), "--output", str(out), "--model", str(case.model), *extra)
        assert proc.returncode == 0, proc.stderr
        assert [label for _, label in read_csv(out)[1:]] == predicting.labels(case.p, threshold)


def test_labels_call_fake_at_or_above_the_threshold() -> None:
    assert predicting.labels(np.array([0.29, 0.3, 0.31, 0.0]), 0.3) == ["Real", "Fake", "Fake", "Real"]


def test_resolve_threshold_takes_the_override_then_the_stored_one_then_the_fallback(caplog) -> None:
    from pipeline.errors import ModelError

    assert serving.resolve_threshold(0.2, 0.7, 0.5) == 0.2
    assert serving.resolve_threshold(None, 0.7, 0.5) == 0.7
    assert not caplog.records
    assert serving.resolve_threshold(None, None, 0.5) == 0.5
    assert [r.getMessage() for r in caplog.records] == [
        "no threshold is stored with this model: using threshold.fixed = 0.5"]
    for bad, source in ((0.0, "--threshold"), (1.0, "--threshold"), (-0.1, "--threshold")):
        with pytest.raises(ModelError, match=f"^{source} must lie in \\(0, 1\\) \\(got {bad}\\)$"):
            serving.resolve_threshold(bad, 0.7, 0.5)
    with pytest.raises(ModelError, match="^the model's calibrated threshold must lie in \\(0, 1\\) \\(got 1.5\\)$"):
        serving.resolve_threshold(None, 1.5, 0.5)
    assert type(serving.resolve_threshold(None, np.float32(0.25), 0.5)) is float
