"""Grad-CAM (pipeline.use.explain, src/explain.py): computed on the served graph, pointing at the evidence,
following the
predicted class, and the tool's files and one-line errors.

The tiny model tells bright noise (FAKE) from dark noise (REAL) on a random ResNet50 (image_size 32)."""
from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import config
from pipeline.errors import ModelError
from pipeline.model import inference, twin
from pipeline.use import explain, predicting

ROOT = Path(__file__).resolve().parents[2]
PREPROCESS = config.load(ROOT / "params.yaml").preprocess
DEFAULT_LAYER = "conv3_block4_out"  # the deepest ResNet50 stage output at least 4×4 at image_size 32


def noise(n: int, low: int, high: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, (n, 32, 32, 3), dtype=np.uint8)


def with_patch(n: int, top: int, left: int, seed: int, side: int = 16) -> np.ndarray:
    """Dark (REAL-looking) noise with one bright (FAKE-looking) square: the only FAKE evidence in the image."""
    x = noise(n, 0, 100, seed)
    x[:, top : top + side, left : left + side] = noise(n, 156, 256, seed + 1)[:, :side, :side]
    return x


def corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    scale = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / scale) if scale else float("nan")


# ------------------------------------------------------------------------------------------------ the graph


def test_the_rebuilt_path_computes_the_served_models_probability_and_logit(tiny_model) -> None:
    """The trap check: a gradient path that skipped the preprocessing or ran a copy of the backbone would give
    other numbers. Brightness offsets around the decision boundary give unsaturated probabilities too."""
    m = tiny_model.model
    grey = np.stack([noise(1, lo, lo + 100, lo)[0] for lo in range(104, 128, 2)])
    x = np.concatenate([tiny_model.x[::8], grey])
    maps, p = explain.gradcam_and_proba(m, x, batch_size=5)  # batches that do not divide N
    np.testing.assert_allclose(p, inference.predict_proba(m, x), atol=1e-5)
    assert ((p > 1e-3) & (p < 1 - 1e-3)).any(), "no unsaturated probability: the check would be weak"
    _, _, logit = explain._gradcam_fn(m, DEFAULT_LAYER)(x.astype(np.float32) / 255.0, np.float32(0.5))
    want = np.asarray(twin.logits_model(m)(x.astype(np.float32) / 255.0, training=False))[:, 0]
    np.testing.assert_allclose(np.asarray(logit), want, rtol=1e-4, atol=1e-3)
    assert maps.shape == (len(x), 4, 4)


def test_maps_have_the_layers_grid_lie_in_0_1_and_are_not_flat(tiny_model) -> None:
    m = tiny_model.model
    assert explain.resolve_layer(m) == DEFAULT_LAYER  # conv5_block3_out is 1×1 at image_size 32: no map at all
    fake = tiny_model.x[tiny_model.y == 1][:16]
    for layer, side in ((None, 4), ("conv2_block3_out", 8), ("conv5_block3_out", 1)):
        maps = explain.gradcam(m, fake, layer)
        assert maps.shape == (16, side, side) and maps.dtype == np.float32
        assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
        np.testing.assert_allclose(maps.max(axis=(1, 2)), 1.0, rtol=1e-6)  # each normalised to its own peak
        if side > 1:
            assert (np.ptp(maps, axis=(1, 2)) > 0.1).all()  # measured: 0.21-0.30 at 4×4
    floats = explain.gradcam(m, fake.astype(np.float32) / 255.0)  # [0, 1] floats are the same images
    np.testing.assert_allclose(floats, explain.gradcam(m, fake), atol=1e-5)
    assert explain.gradcam(m, fake[:0]).shape == (0, 4, 4)


def test_a_wrong_layer_is_a_model_error_naming_real_ones(tiny_model) -> None:
    with pytest.raises(ModelError, match="no layer of that name.*conv5_block3_out"):
        explain.resolve_layer(tiny_model.model, "conv9_block1_out")


# ----------------------------------------------------------------------------------------- what maps show


def test_the_map_points_at_the_evidence_and_follows_it(tiny_model) -> None:
    """A bright square on dark noise is the image's only FAKE evidence: the FAKE map's mass sits on the square's
    2×2 cells, wherever the square is. Measured (per-image means): 0.82-0.93 of the peak there vs 0.31-0.46
    elsewhere, a margin of at least 0.45. (The tiny model calls only the top-left placement Fake, so all are
    explained as FAKE with ``threshold=0``.)"""
    m = tiny_model.model
    placed = {(0, 0): with_patch(8, 0, 0, 10)}
    p = explain.gradcam_and_proba(m, placed[0, 0])[1]
    assert (p >= 0.5).all()
    np.testing.assert_array_equal(explain.gradcam(m, placed[0, 0]), explain.gradcam(m, placed[0, 0], threshold=0.0))
    for top, left in ((0, 16), (16, 0), (16, 16)):
        placed[top, left] = with_patch(8, top, left, 10)
    for (top, left), x in placed.items():
        maps = explain.gradcam(m, x, threshold=0.0)
        cells = maps[:, top // 8 : top // 8 + 2, left // 8 : left // 8 + 2].mean(axis=(1, 2))
        rest = (maps.sum(axis=(1, 2)) - 4 * cells) / 12
        assert (cells > rest + 0.3).all(), ((top, left), cells, rest)


def test_the_map_changes_when_the_predicted_class_flips(tiny_model) -> None:
    """Bright noise (FAKE) and the very same pattern shifted dark (REAL). REAL, for this model, is the absence of
    the bright cue: the REAL logit's gradient weighs every channel negatively and its ReLU'd map is all zero
    (measured on every dark image), so the maps differ by their whole FAKE map (mean |difference| 0.84-0.88)."""
    m = tiny_model.model
    bright = tiny_model.x[tiny_model.y == 1][:8]
    dark = (bright - 156).astype(np.uint8)  # bright is 156..255: the same noise, 0..99
    maps_fake, p_fake = explain.gradcam_and_proba(m, bright)
    maps_real, p_real = explain.gradcam_and_proba(m, dark)
    assert (p_fake >= 0.5).all() and (p_real < 0.5).all()
    diff = np.abs(maps_fake - maps_real).mean(axis=(1, 2))
    assert (diff > 0.3).all(), diff
    # The explained class is the predicted one: the same dark images explained as FAKE (threshold 0 calls
    # every image Fake) give non-empty maps.
    as_fake = explain.gradcam(m, dark, threshold=0.0)
    assert (as_fake.max(axis=(1, 2)) == 1.0).all()
    assert np.abs(as_fake - maps_real).mean() > 0.3


# ----------------------------------------------------------------------------------------------- pictures


def test_overlay_blends_the_upscaled_image_and_map() -> None:
    image = noise(1, 0, 256, 3)[0]
    flat = explain.overlay(image, np.zeros((4, 4), np.float32), size=128)
    assert flat.shape == (128, 128, 3) and flat.dtype == np.uint8
    from matplotlib import colormaps

    cold = np.asarray(colormaps["jet"](0.0)[:3]) * 255
    big = np.repeat(np.repeat(image, 4, axis=0), 4, axis=1).astype(np.float64)  # nearest neighbours
    np.testing.assert_allclose(flat, (1 - explain.ALPHA) * big + explain.ALPHA * cold, atol=0.51)
    hot = explain.overlay(image, np.ones((4, 4), np.float32), size=64)
    assert hot.shape == (64, 64, 3) and not np.array_equal(hot, flat[::2, ::2])


def test_output_names_are_flat_pngs() -> None:
    assert explain.output_name("nested/deeper/a.JPG") == "nested__deeper__a.png"
    assert explain.output_name("b.png") == "b.png"
    assert explain.output_name("dir.v2/noext") == "dir.v2__noext.png"
    names = ["a.jpg", "a.png", "b.jpg", "d/c.png", "d__c.png", "a.jpg.png"]
    assert explain.output_names(names) == {
        "a.jpg": "a.jpg.png", "a.png": "a.png.png", "b.jpg": "b.png", "d/c.png": "d__c.png.png",
        "d__c.png": "d__c.png~2.png", "a.jpg.png": "a.jpg~2.png"}


def test_grid_figure_has_four_panels_per_row(tiny_model) -> None:
    m = tiny_model.model
    clean = tiny_model.x[[64, 65, 0]]  # Fake, Fake, Real
    attacked = np.concatenate([(clean[:2] - 156).astype(np.uint8), clean[2:]]).astype(np.float32) / 255.0
    maps_c, p_c = explain.gradcam_and_proba(m, clean)
    maps_a, p_a = explain.gradcam_and_proba(m, attacked)
    fig = explain.grid_figure(clean, attacked, maps_c, maps_a, p_c, p_a, tiny_model.y[[64, 65, 0]])
    from matplotlib.figure import Figure

    assert isinstance(fig, Figure) and len(fig.axes) == 12
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("clean\ntrue Fake\npredicted Fake, P(FAKE) 1.00")
    assert "true Fake\npredicted Real" in titles[2]
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")  # draws with Agg, no pyplot
    assert buffer.getvalue().startswith(b"\x89PNG")


# -------------------------------------------------------------------------------------------------- the tool


def run_explain(*args: str) -> subprocess.CompletedProcess:
    # This checkout's package first: the installed (editable) one may point at another clone.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "src/explain.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path}, timeout=300)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    (d / "nested").mkdir(parents=True)
    Image.fromarray(noise(1, 156, 256, 1)[0]).save(d / "bright.png")
    Image.fromarray(noise(1, 0, 100, 2)[0]).save(d / "dark.jpg", quality=95)
    Image.fromarray(with_patch(1, 0, 0, 3)[0]).save(d / "nested" / "patch.png")
    Image.fromarray(np.random.default_rng(4).integers(156, 256, (40, 50, 3), dtype=np.uint8)).save(d / "odd.png")
    Image.fromarray(noise(1, 0, 100, 5)[0]).save(d / "odd.jpg")  # both want odd.png
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(200))
    (d / "notes.txt").write_text("not an image\n")
    return d


def test_the_tool_writes_one_overlay_per_image_and_the_csv(folder: Path, tmp_path: Path, tiny_model,
                                                            tiny_model_file) -> None:
    out = tmp_path / "out"
    proc = run_explain("--input", str(folder), "--output", str(out), "--model", str(tiny_model_file))
    assert proc.returncode == 0, proc.stderr
    names = ["bright.png", "dark.jpg", "nested/patch.png", "odd.jpg", "odd.png"]
    pngs = ["bright.png", "dark.png", "nested__patch.png", "odd.jpg.png", "odd.png.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*pngs, "explanations.csv"])  # no temporary left
    for png in pngs:
        with Image.open(out / png) as img:
            assert img.format == "PNG" and img.size == (128, 128) and img.mode == "RGB"
    with open(out / "explanations.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Image Name", "Predicted Label", "P(FAKE)"]
    assert [r[0] for r in rows[1:]] == names
    assert [r[1] for r in rows[1:]] == ["Fake", "Real", "Fake", "Real", "Fake"]
    # The saved model, loaded in another process, through the rebuilt path: the served model's probabilities.
    found = predicting.read_folder(folder, PREPROCESS.resize, PREPROCESS.max_pixels)
    np.testing.assert_allclose([float(r[2]) for r in rows[1:]], inference.predict_proba(tiny_model.model, found.x),
                               atol=1e-5)
    assert "corrupt.jpg" in proc.stderr and "notes.txt" not in proc.stderr
    assert "explain: 5 images (3 Fake, 1 skipped)" in proc.stdout

    # One image file on its own, decoded as a folder's would be.
    single = tmp_path / "single"
    proc = run_explain("--input", str(folder / "nested" / "patch.png"), "--output", str(single), "--model",
                       str(tiny_model_file), "--layer", "conv2_block3_out")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in single.iterdir()) == ["explanations.csv", "patch.png"]
    assert "layer conv2_block3_out" in proc.stdout


def test_a_missing_input_is_one_error_line_and_writes_nothing(tmp_path: Path, tiny_model_file) -> None:
    out = tmp_path / "out"
    proc = run_explain("--input", str(tmp_path / "nowhere"), "--output", str(out), "--model", str(tiny_model_file))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nowhere" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_the_tool_labels_at_the_threshold_stored_beside_the_model(tmp_path: Path, graded_model,
                                                                   graded_model_file: Path) -> None:
    from tests.conftest import model_with_stored_threshold

    case = model_with_stored_threshold(tmp_path, graded_model.model, graded_model_file, n_per_class=6)
    proc = run_explain("--input", str(case.folder), "--output", str(tmp_path / "out"), "--model", str(case.model))
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "out" / "explanations.csv", newline="") as f:
        assert [r[1] for r in list(csv.reader(f))[1:]] == predicting.labels(case.p, case.threshold)
