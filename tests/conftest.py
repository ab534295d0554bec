"""Shared fixtures: validated params writing into tmp_path, an isolated MLflow store per test, and one tiny
trained classifier per test session (per xdist worker)."""
from __future__ import annotations

import os

# Before anything imports TensorFlow (test modules are imported after this file).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TQDM_DISABLE", "1")

import contextlib  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pipeline import config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARAMS_FILE = ROOT / "params.yaml"
SEED = 42


def tmp_overrides(tmp_path: Path) -> list[str]:
    """``-S`` overrides that move every output of params.yaml into ``tmp_path`` (nothing lands in the repo)."""
    default = config.load(PARAMS_FILE)
    out = [f"paths.{key}={tmp_path / value}" for key, value in default.paths.model_dump().items()]
    out += [
        f"tune.storage=sqlite:///{tmp_path}/optuna/study.db",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlruns/mlflow.db",
        f"mlflow.experiment=test-{uuid.uuid4().hex[:12]}",
        # Unit tests work on a frozen backbone (heads on cached features, seconds); the offline default trains
        # the whole backbone, which the end-to-end test covers.
        "model.trainable_from=null",
    ]
    return out


@pytest.fixture
def params(tmp_path: Path) -> config.Params:
    """params.yaml as the stages see it, with every path, the Optuna storage and the MLflow store in tmp_path."""
    return config.load(PARAMS_FILE, tmp_overrides(tmp_path))


# ---------------------------------------------------------------------------------------------------- MLflow


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated MLflow SQLite store. Creating one costs ~5 s; copying it costs milliseconds, so
    each test gets a private copy (and no two processes ever create the same store at once)."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@dataclass
class MlflowStore:
    uri: str
    root: Path
    experiment: str


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _mlflow_template: Path, params: config.Params):
    """A private MLflow store at ``params.mlflow.tracking_uri`` (tmp_path/mlruns/mlflow.db), also exported as
    ``MLFLOW_TRACKING_URI``; ``experiment`` is unique to the test."""
    import mlflow
    import mlflow.tracking.fluent

    root = tmp_path / "mlruns"
    root.mkdir(exist_ok=True)
    shutil.copy(_mlflow_template, root / "mlflow.db")
    uri = f"sqlite:///{root}/mlflow.db"
    assert params.mlflow.tracking_uri == uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # an earlier set_tracking_uri in this process would win over the env var
    yield MlflowStore(uri, root, params.mlflow.experiment)
    while mlflow.active_run() is not None:
        mlflow.end_run()
    # set_experiment is process-global (and exports MLFLOW_EXPERIMENT_ID): do not leak it into the next test.
    mlflow.tracking.fluent._active_experiment_id = None
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


# ---------------------------------------------------------------------------------------------- tiny model


def separable_images(n_per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 32×32 RGB noise: REAL (0) dark, FAKE (1) bright; easy even for a randomly initialised backbone."""
    rng = np.random.default_rng(seed)
    dark = rng.integers(0, 100, (n_per_class, 32, 32, 3), dtype=np.uint8)
    bright = rng.integers(156, 256, (n_per_class, 32, 32, 3), dtype=np.uint8)
    return np.concatenate([dark, bright]), np.repeat(np.array([0, 1], np.uint8), n_per_class)


HEAD_SEED = 1


@dataclass
class TinyModel:
    model: object  # keras.Model: pixels in [0, 1] -> P(FAKE), a trained head on a random ResNet50 (weights: none)
    head: object  # its head (pooled features -> logit)
    model_cfg: config.Model
    x: np.ndarray  # the uint8 training images (REAL dark, FAKE bright)
    y: np.ndarray
    features: np.ndarray  # their pooled backbone features


@pytest.fixture(scope="session")
def tiny_model() -> TinyModel:
    """Built and trained once per worker: ~10 s (frozen backbone, head on cached features)."""

    from pipeline.fit import features, training
    from pipeline.model import inference, network

    cfg = config.load(PARAMS_FILE, ["model.trainable_from=null"]).model
    x, y = separable_images(64)
    built = network.build_model(cfg, dropout=0.0, seed=SEED)
    feats = features.extract(built, x, 128)
    # The head's own seed (initial weights, shuffling): where its boundary falls between dark and bright is chance,
    # and the Grad-CAM tests want one that leaves some grey images unsaturated and reads the bright patch as the
    # evidence. Small batches, enough steps for the head's BatchNormalization moving statistics to settle.
    head, _ = training.fit_head(training.Arrays(feats, y, feats, y), dropout=0.0, learning_rate=3e-3, l2=cfg.l2,
                                epochs=12, batch_size=8, seed=HEAD_SEED)
    full = network.assemble(network.backbone_of(built), head, cfg.image_size)
    p = inference.predict_proba(full, x)
    assert ((p >= 0.5) == y).mean() == 1.0, "the tiny model did not learn bright vs dark"
    return TinyModel(full, head, cfg, x, y, feats)


def small_model(seed: int = 0):
    """network.assemble's shape (pixels in [0, 1], the model's preprocessing, global average pooling, the head, a
    sigmoid) on a two-convolution backbone whose batch norms the compute twin folds: for tests of what the pipeline
    does with any model, where tracing a ResNet50 costs tens of seconds and buys nothing. Its head is untrained,
    so P(FAKE) stays graded."""
    import keras
    from keras import layers

    from pipeline.model import network

    keras.utils.set_random_seed(seed)
    pixels = keras.Input((32, 32, 3))
    x = layers.Conv2D(8, 3, strides=4, use_bias=False, name="conv1")(pixels)
    x = layers.Activation("relu", name="stage_out")(layers.BatchNormalization(name="bn1")(x))
    x = layers.BatchNormalization(name="bn2")(layers.Conv2D(network.FEATURE_DIM, 1, strides=2, name="conv2")(x))
    return network.assemble(keras.Model(pixels, x, name="backbone"), network.build_head(0.0, 1e-4, seed=seed), 32)


def cue_images(n_per_class: int, seed: int = 0, lines: float = 4.0,
               levels: tuple[tuple[float, float], tuple[float, float]] = ((40, 150), (106, 216)),
               ) -> tuple[np.ndarray, np.ndarray]:
    """uint8 32×32 RGB noise with two cues, like the built-in sample's: brightness, robust but only partly
    predictive (REAL and FAKE ``levels`` overlap between 106 and 150), and the sample's line pattern with the
    class's sign, fully predictive but flipped by any attack of 2 x ``lines``/255. A model trained on clean images
    leans on the lines, so attacks flip it; P(FAKE) spreads over the brightness overlap."""
    from pipeline.data.sample import LINES

    rng = np.random.default_rng(seed)
    y = np.repeat(np.array([0, 1], np.uint8), n_per_class)
    level = np.concatenate([rng.uniform(*levels[0], n_per_class), rng.uniform(*levels[1], n_per_class)])
    x = level[:, None, None, None] + rng.normal(0, 12, (2 * n_per_class, 32, 32, 3))
    x += np.where(y == 1, lines, -lines)[:, None, None, None] * LINES
    return np.clip(np.rint(x), 0, 255).astype(np.uint8), y


def threshold_that_matters(p: np.ndarray, other: float = 0.5, min_changed: int = 2) -> float:
    """A threshold that labels at least ``min_changed`` of the scores ``p`` otherwise than ``other`` does, in the
    widest gap between two scores, so that float noise cannot flip a label: a test that a threshold is used fails
    when it is not."""
    ranked = np.unique(np.asarray(p, np.float64))
    mids, gaps = (ranked[1:] + ranked[:-1]) / 2, np.diff(ranked)
    changed = np.array([np.sum((p >= t) != (p >= other)) for t in mids])
    gaps[changed < min_changed] = -1.0
    assert gaps.max() > 0, "no threshold changes enough labels: the scores are too few or saturated"
    return float(mids[np.argmax(gaps)])


def _graded(built, epochs: int = 8, learning_rate: float = 1e-3, graded_share: float = 0.0) -> TinyModel:
    """A head trained briefly on clean :func:`cue_images` over ``built``'s frozen backbone (see graded_model), with
    at least ``graded_share`` of its P(FAKE) on fresh cue images between 0.05 and 0.95."""
    from pipeline.fit import features, training
    from pipeline.model import inference, network

    cfg = config.load(PARAMS_FILE, ["model.trainable_from=null"]).model
    x, y = cue_images(128)
    feats = features.extract(built, x, 128)
    # A short fit: trained to the end, the head turns the lines into certainties and P(FAKE) into 0 or 1.
    head, _ = training.fit_head(training.Arrays(feats, y, feats, y), dropout=0.0, learning_rate=learning_rate,
                                l2=cfg.l2, epochs=epochs, batch_size=32, seed=HEAD_SEED)
    full = network.assemble(network.backbone_of(built), head, cfg.image_size)
    fresh, labels = cue_images(64, seed=2)
    p = inference.predict_proba(full, fresh)
    assert ((p >= 0.5) == labels).mean() >= 0.85, "the graded model did not learn its cues"
    assert ((p > 0.05) & (p < 0.95)).mean() >= graded_share, "the graded model's P(FAKE) saturated"
    return TinyModel(full, head, cfg, x, y, feats)


@pytest.fixture(scope="session")
def graded_model() -> TinyModel:
    """A tiny model whose answers are not all 0 or 1 and that attacks can flip: a head trained on clean
    :func:`cue_images` (a random frozen ResNet50 below it). Thresholds, attacks and defences change its labels, so
    tests of them can fail. Built once per worker: ~10 s."""
    from pipeline.model import network

    cfg = config.load(PARAMS_FILE, ["model.trainable_from=null"]).model
    return _graded(network.build_model(cfg, dropout=0.0, seed=SEED), graded_share=0.05)


@pytest.fixture(scope="session")
def small_graded_model() -> TinyModel:
    """graded_model's training on :func:`small_model`'s backbone: it reads the same cues and attacks flip it as
    they flip the graded model, but an attack's pass costs a fraction of a ResNet50's. Its 2 048 features separate
    the cues sooner, so its head trains less, or its P(FAKE) saturates (figures: bench/README.md#the-test-suite)."""
    return _graded(small_model(), epochs=2, learning_rate=3e-4)


@dataclass
class StoredThreshold:
    folder: Path  # cue images as PNG files
    p: np.ndarray  # the graded model's P(FAKE) on them, in the folder's order
    threshold: float  # stored beside ``model``; its labels differ from 0.5's on at least two images
    model: Path  # a copy of the graded model's file with that threshold in the JSON beside it


def model_with_stored_threshold(tmp_path: Path, model, model_file: Path, n_per_class: int = 12) -> StoredThreshold:
    """A folder for the tools and a model whose stored threshold matters on it: a tool that ignores the threshold
    stored beside a model gives other labels. ``model``: what ``model_file`` holds, with P(FAKE) that does not
    saturate (the graded model, or :func:`small_model`)."""
    import json

    from PIL import Image

    from pipeline.model import inference
    from pipeline.use import predicting

    folder = tmp_path / "graded"
    folder.mkdir()
    for i, img in enumerate(cue_images(n_per_class, seed=3)[0]):
        Image.fromarray(img).save(folder / f"{i:02d}.png")
    pre = config.load(PARAMS_FILE).preprocess
    p = inference.predict_proba(model, predicting.read_folder(folder, pre.resize, pre.max_pixels).x)
    stored = threshold_that_matters(p)
    mine = tmp_path / "mine.keras"
    shutil.copy(model_file, mine)
    (tmp_path / "mine.json").write_text(json.dumps({"threshold": stored}))  # as train and advtrain write it
    return StoredThreshold(folder, p, stored, mine)


@pytest.fixture(scope="session")
def small_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`small_model` saved with :func:`pipeline.model.store.save` (a few MB: a tool in a subprocess loads it
    in a second, where it takes a ResNet50 tens): for the tests of a tool's plumbing, not of what a model learns."""
    from pipeline.model import store

    path = tmp_path_factory.mktemp("small-model") / "model.keras"
    store.save(small_model(), path)
    return path


@pytest.fixture(scope="session")
def graded_model_file(graded_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.model import store

    path = tmp_path_factory.mktemp("graded-model") / "model.keras"
    store.save(graded_model.model, path)
    return path


@pytest.fixture(scope="session")
def small_graded_model_file(small_graded_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.model import store

    path = tmp_path_factory.mktemp("small-graded-model") / "model.keras"
    store.save(small_graded_model.model, path)
    return path


@pytest.fixture(scope="session")
def tiny_model_file(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model saved with :func:`pipeline.model.store.save` (~100 MB, once per worker)."""
    from pipeline.model import store

    path = tmp_path_factory.mktemp("tiny-model") / "model.keras"
    store.save(tiny_model.model, path)
    return path


# ------------------------------------------------------------------------------------------ tracking server


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_mlflow_server(folder: Path, backend_uri: str, *artifacts: str):
    """``mlflow server`` on a free loopback port over ``backend_uri`` (``artifacts``: its artifact options),
    logging to ``folder/server.log``; yields its URL once it answers, and stops it afterwards."""
    import urllib.request

    url = f"http://127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
         "--backend-store-uri", backend_uri, *artifacts, "--workers", "1"],
        stdout=open(folder / "server.log", "w"), stderr=subprocess.STDOUT,  # noqa: SIM115 (the server keeps it)
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.25)
        else:
            raise AssertionError(f"mlflow server did not start: {(folder / 'server.log').read_text()[-3000:]}")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real tracking server on loopback (SQLite backend, artifacts served by the server), as a team runs one."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    with running_mlflow_server(folder, f"sqlite:///{folder}/mlflow.db",
                               "--artifacts-destination", str(folder / "artifacts")) as url:
        yield url
