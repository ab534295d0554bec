"""The documented options beyond the default: the ImageNet notop file users download by hand (Keras's legacy HDF5
layout), mixed_bfloat16, and an unfrozen backbone (trials and `train` on images)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import keras
import mlflow
import numpy as np
import optuna
import pytest

from pipeline import config, tracking
from pipeline.data import preprocess, sample
from pipeline.fit import training, tuning
from pipeline.model import inference, network, store
from tests.conftest import PARAMS_FILE, separable_images, tmp_overrides

ROOT = Path(__file__).resolve().parents[2]
# The last conv layer only: the gradient still crosses the whole head, but training stays cheap on a CPU.
LAST_CONV = "conv5_block3_3_conv"


def model_cfg(**changes) -> config.Model:
    base = config.load(PARAMS_FILE, ["model.trainable_from=null"]).model
    return config.Model(**{**base.model_dump(), **changes})


def test_backbone_loads_the_legacy_notop_h5_that_users_download(tmp_path: Path) -> None:
    # The real file cannot be fetched here: write one in Keras's legacy layout (what keras.applications downloads),
    # with random values, under the real file's name.
    from keras.src.legacy.saving import legacy_h5_format

    cfg = model_cfg()
    saved = network.build_backbone(cfg)
    rng = np.random.default_rng(5)
    saved.set_weights([w + rng.normal(0, 0.01, w.shape).astype(w.dtype) for w in saved.get_weights()])
    path = tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, saved)
        assert "layer_names" in f.attrs and "conv1_conv" in f  # the legacy layout, not Keras 3's .weights.h5
    loaded = network.build_backbone(model_cfg(weights=str(path)))
    for a, b in zip(loaded.get_weights(), saved.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])  # float16: what a GPU runs fastest
def test_mixed_precision_model_predicts_float32_probabilities_and_is_attackable(precision: str) -> None:
    from pipeline.judge.attacks import Attacker

    try:
        m = network.build_model(model_cfg(precision=precision), dropout=0.0, seed=1)
        assert m.get_layer("preprocess").compute_dtype == precision.removeprefix("mixed_")
        x, y = separable_images(4)
        p = inference.predict_proba(m, x)
        assert p.dtype == np.float32 and p.shape == (8,) and np.all((p >= 0) & (p <= 1))
        x_adv = Attacker(m, config.Attack(name="fgsm", epsilon=8), 0).perturb(x, y, 8)
        assert np.abs(x_adv - x / 255.0).max() <= 8 / 255 + 1e-6 and np.abs(x_adv - x / 255.0).max() > 0
    finally:
        keras.mixed_precision.set_global_policy("float32")  # the policy is process-global


def test_fit_model_trains_the_unfrozen_layers_on_images() -> None:
    m = network.build_model(model_cfg(trainable_from=LAST_CONV), dropout=0.0, seed=2)
    x, y = separable_images(16)
    backbone = network.backbone_of(m)
    frozen_before = backbone.get_layer("conv1_conv").get_weights()[0].copy()
    open_before = backbone.get_layer(LAST_CONV).get_weights()[0].copy()
    history = training.fit_model(m, training.Arrays(x, y, x, y), 1e-3, epochs=1, batch_size=8, seed=0)
    assert {"loss", "val_loss", "val_f1", "val_balanced_accuracy"} <= set(history)
    assert np.array_equal(backbone.get_layer("conv1_conv").get_weights()[0], frozen_before)
    assert not np.array_equal(backbone.get_layer(LAST_CONV).get_weights()[0], open_before)


def test_objective_trains_images_when_the_backbone_is_unfrozen(params, mlflow_store) -> None:
    params = params.model_copy(update={
        "model": params.model.model_copy(update={"trainable_from": LAST_CONV}),
        "tune": params.tune.model_copy(update={"epochs": 1, "batch_size": 8, "objective": "robust"})})
    tracking.setup(params.mlflow)
    x, y = separable_images(8)
    trial = optuna.trial.FixedTrial({"dropout": 0.2, "learning_rate": 1e-3})
    with mlflow.start_run(run_name="parent"):
        value = tuning.Objective(params, training.Arrays(x, y, x, y))(trial)
    assert 0.0 <= value <= 1.0 and value == trial.user_attrs["robust"]
    assert {"f1", "adv_f1", "robust"} <= set(trial.user_attrs)


@pytest.mark.slow
def test_train_stage_with_an_unfrozen_backbone(tmp_path: Path) -> None:
    overrides = tmp_overrides(tmp_path)
    params = config.load(PARAMS_FILE, overrides)
    raw = tmp_path / "raw"
    sample.write_sample(raw, config.Sample(train_per_class=10, test_per_class=4, jpeg_quality=95), 0, progress=False)
    preprocess.preprocess(raw, params.paths.processed, params.preprocess, 0, progress=False)
    params.paths.best_params.parent.mkdir(parents=True, exist_ok=True)
    params.paths.best_params.write_text(json.dumps({"dropout": 0.1, "learning_rate": 1e-3}))
    sets = [arg for o in overrides + [f"model.trainable_from={LAST_CONV}", "train.epochs=1", "train.batch_size=8"]
            for arg in ("-S", o)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, "src/train.py", *sets], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    trained = store.load(params.paths.model)
    fresh = network.build_model(model_cfg(trainable_from=LAST_CONV), dropout=0.1, seed=params.base.seed)
    def kernel(m, layer):
        return network.backbone_of(m).get_layer(layer).get_weights()[0]

    assert np.array_equal(kernel(trained, "conv1_conv"), kernel(fresh, "conv1_conv"))  # frozen: the seeded init
    assert not np.array_equal(kernel(trained, LAST_CONV), kernel(fresh, LAST_CONV))  # unfrozen: trained
    metrics_json = json.loads((params.paths.metrics / "train.json").read_text())
    assert metrics_json["epochs_run"] == 1 and "val_balanced_accuracy" in metrics_json


def test_the_hand_written_training_loops_scale_the_loss_under_float16() -> None:
    """Keras's fit adds loss scaling under mixed_float16 itself; the head trainer and advtrain's step must ask for
    it (float16 gradients of a small loss underflow to zero), and a second fit starts from a fresh scale."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.array([0, 1], np.uint8), 32)
    feats = (rng.normal(0, 1, (64, 2048)) + np.where(y == 1, 0.3, -0.3)[:, None]).astype(np.float32)
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        assert isinstance(training.adam(1e-3), keras.optimizers.LossScaleOptimizer)
        trainer = training.HeadTrainer(training.Arrays(feats, y, feats, y), l2=1e-4, batch_size=16)
        runs = [trainer.fit(0.0, 1e-3, epochs=3, seed=5)[1] for _ in range(2)]
        assert runs[0]["loss"][-1] < runs[0]["loss"][0] and np.isfinite(runs[0]["loss"]).all()
        assert runs[1]["loss"] == runs[0]["loss"]  # the same seed, the same fit: the scale was reset, not zeroed
        assert float(trainer.optimizer.dynamic_scale.numpy()) > 1.0
    finally:
        keras.mixed_precision.set_global_policy("float32")  # the policy is process-global
    assert type(training.adam(1e-3)) is keras.optimizers.Adam
