"""The performance bounds keep their meaning: the head's compiled training loop behaves like a Keras fit (history,
callbacks, early stopping, seeding); advtrain's images_per_epoch and val_images bound what it touches; evaluate's
diagnostic subset carries robust_score and its interval with it."""
from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline import config
from pipeline.fit import training
from pipeline.judge import corruptions, evaluation, metrics
from pipeline.model import inference, network

PARAMS_FILE = Path(__file__).resolve().parents[2] / "params.yaml"


def separable_features(n: int, seed: int = 0) -> training.Arrays:
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.uint8)
    x = rng.standard_normal((n, network.FEATURE_DIM), dtype=np.float32)
    x[:, :8] += 3.0 * (2.0 * y[:, None] - 1.0)  # the class shifts 8 of the 2048 features
    return training.Arrays(x, y, x[: n // 2], y[: n // 2])


def fit(data, epochs=3, batch_size=32, callbacks=(), seed=0):
    keras.utils.set_random_seed(seed)  # the stages seed NumPy, Python and TensorFlow the same way
    return training.fit_head(data, dropout=0.2, learning_rate=3e-3, l2=1e-4, epochs=epochs, batch_size=batch_size,
                             callbacks=list(callbacks))


def test_head_fit_learns_and_reports_like_a_keras_fit() -> None:
    data = separable_features(300)  # 300 / 32: a short last batch every epoch
    head, history = fit(data, epochs=4)
    assert {"loss", "accuracy", "val_loss", "val_f1", "val_balanced_accuracy", "val_macro_f1"} <= set(history)
    assert all(len(v) == 4 for v in history.values())
    assert history["loss"][-1] < history["loss"][0]
    p = inference.predict_proba(network.head_classifier(head), data.x_val, 64)
    assert metrics.measure(data.y_val, p) == 1.0
    assert history["val_loss"][-1] == pytest.approx(metrics.log_loss(data.y_val, p) + float(sum(head.losses)),
                                                    rel=1e-4)


def test_head_fit_is_reproducible_under_the_same_seed() -> None:
    data = separable_features(200)
    a, hist_a = fit(data, seed=3)
    b, hist_b = fit(data, seed=3)
    assert hist_a["loss"] == hist_b["loss"]
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)


def test_one_trainer_refits_from_scratch_each_time_and_traces_its_loop_once() -> None:
    # The tuning trials share one HeadTrainer: a fit must not inherit anything (weights, batch norm statistics,
    # optimizer slots, learning rate, dropout rate or noise, shuffling) from the fits before it.
    data = separable_features(200)
    trainer = training.HeadTrainer(data, l2=1e-4, batch_size=32)
    a, hist_a = trainer.fit(0.2, 3e-3, 3, seed=5)
    other, hist_other = trainer.fit(0.45, 1e-2, 2, seed=9)  # another trial in between
    b, hist_b = trainer.fit(0.2, 3e-3, 3, seed=5)
    alone, hist_alone = training.fit_head(data, 0.2, 3e-3, 1e-4, 3, 32, seed=5)
    assert hist_a["loss"] == hist_b["loss"] == hist_alone["loss"]
    assert hist_other["loss"][0] != hist_a["loss"][0]
    for wa, wb, wc in zip(a.get_weights(), b.get_weights(), alone.get_weights()):
        np.testing.assert_array_equal(wa, wb)
        np.testing.assert_array_equal(wa, wc)
    assert trainer._epoch.experimental_get_tracing_count() == 1
    # Each returned head is its own model, with its fit's dropout rate, and keeps its weights after later fits.
    assert a.get_layer("head_dropout").rate == 0.2 and other.get_layer("head_dropout").rate == 0.45
    assert not np.array_equal(a.get_weights()[4], other.get_weights()[4])


def test_the_dropout_rate_reaches_the_compiled_loop() -> None:
    # One trace for every rate: the rate must be read from its variable, not baked into the graph.
    data = separable_features(200)
    trainer = training.HeadTrainer(data, l2=1e-4, batch_size=32)
    losses = {rate: trainer.fit(rate, 3e-3, 2, seed=5)[1]["loss"] for rate in (0.0, 0.5, 0.0, 0.9)}
    assert losses[0.0] == trainer.fit(0.0, 3e-3, 2, seed=5)[1]["loss"]
    assert len({tuple(v) for v in losses.values()}) == 3  # the same seed: only the rate differs
    assert trainer._epoch.experimental_get_tracing_count() == 1
    x = tf.constant(data.x_train[:64])
    trainer._dropout.assign(0.0)
    np.testing.assert_array_equal(trainer._logit(x), trainer._logit(x))
    trainer._dropout.assign(0.5)
    assert not np.array_equal(trainer._logit(x), trainer._logit(x))


def test_callbacks_stop_the_loop_and_restore_the_best_epoch() -> None:
    data = separable_features(200)
    seen = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append((epoch, dict(logs)))

    stop = keras.callbacks.EarlyStopping(monitor="val_balanced_accuracy", mode="max", patience=1,
                                         restore_best_weights=True)
    _, history = fit(data, epochs=30, callbacks=[Record(), stop])
    assert 2 <= len(history["loss"]) < 30  # perfect from the first epochs on: it stops, not runs all 30
    assert [e for e, _ in seen] == list(range(len(history["loss"])))
    assert "val_balanced_accuracy" in seen[0][1]  # validation scores are in the logs before other callbacks run


def test_an_exception_from_a_callback_ends_the_fit() -> None:
    class Prune(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("pruned")

    with pytest.raises(RuntimeError, match="pruned"):
        fit(separable_features(100), epochs=5, callbacks=[Prune()])


def test_advtrain_draws_images_per_epoch_afresh_each_epoch(monkeypatch) -> None:
    from tests.conftest import separable_images, small_model

    picks = []
    real = training.image_dataset

    def spy(x, y, batch_size, shuffle, seed, pick=None):
        picks.append(None if pick is None else np.sort(pick))
        return real(x, y, batch_size, shuffle, seed, pick)

    monkeypatch.setattr(training, "image_dataset", spy)
    params = config.load(PARAMS_FILE, ["advtrain.trainable_from=null", "advtrain.batch_size=16",
                                       "advtrain.epochs=2", "advtrain.images_per_epoch=40"])
    m = small_model()  # any model of the pipeline's shape: what is drawn does not depend on it
    x, y = separable_images(64)
    result = training.adversarial_finetune(m, training.Arrays(x, y, x[:20], y[:20]), params.advtrain,
                                           params.evaluate, 0)
    assert [len(p) for p in picks] == [40, 40] and not np.array_equal(picks[0], picks[1])
    assert len(np.unique(picks[0])) == 40
    p_clean, p_adv = result.p_val  # the kept epoch's validation probabilities, for the threshold
    assert p_clean.shape == p_adv.shape == (20,)
    assert result.history[result.kept]["val_robust_score"] == pytest.approx(
        metrics.robust_score(y[:20], p_clean, p_adv, params.evaluate.weights, params.evaluate.measure))


def test_the_diagnostic_runs_on_its_subset_and_robust_score_counts_those_images(tiny_model, monkeypatch) -> None:
    applied, real_apply = [], corruptions.apply

    def spy(x, corruption, seed=0):
        applied.append((corruption.describe(), np.array_equal(x, tiny_model.x[evaluation.stratified_subset(
            tiny_model.y, 32, 0)])))
        return real_apply(x, corruption, seed)

    monkeypatch.setattr(corruptions, "apply", spy)
    params = config.load(PARAMS_FILE, ["evaluate.diagnostic_images=32", "evaluate.curve_images=16",
                                       "evaluate.epsilons=[0, 8]", "evaluate.bootstrap=50", "evaluate.attacks=[]"])
    cfg = params.evaluate
    x, y = tiny_model.x, tiny_model.y
    result = evaluation.run_protocol(tiny_model.model, x, y, cfg, 0, 0.5, "tiny", config.Inference(engine="tensorflow"))
    sub = result.diagnosed
    assert len(sub) == len(result.p_diagnostic) == 32 and np.bincount(y[sub]).tolist() == [16, 16]
    assert len(result.p_clean) == len(result.p_adv) == len(x)  # the mission's attack covers every image
    worst = metrics.worst_case(y[sub], result.p_adv[sub], result.p_diagnostic)
    assert result.robust_score == pytest.approx(
        metrics.robust_score(y[sub], result.p_clean[sub], worst, cfg.weights, cfg.measure))
    ci = evaluation.intervals(result, y, cfg, 0, 0.5)
    assert ci["robust_score"]["low"] <= result.robust_score <= ci["robust_score"]["high"]
    assert ci["weighted_f1"]["low"] <= result.weighted_f1 <= ci["weighted_f1"]["high"]
    # corruptions run on the same subset, the uncorrupted figure first to read them against
    assert list(result.corrupted) == ["none", *(k.describe() for k in cfg.corruptions)] and len(cfg.corruptions) >= 8
    assert result.corrupted["none"]["balanced_accuracy"] == pytest.approx(
        metrics.measure(y[sub], result.p_clean[sub], "balanced_accuracy"))
    assert applied == [(k.describe(), True) for k in cfg.corruptions]  # each once, on the diagnostic subset
    assert result.summary({"always_fake_weighted_f1": 0.0})["corruptions"] is result.corrupted


def test_bootstrap_over_all_images_scores_robust_score_on_the_same_resamples() -> None:
    # Without a subset, robust_score is resampled together with the other figures (paired): with one set of scores
    # for clean, attacked and worst, its interval is exactly clean balanced accuracy's. Fresh draws would move it.
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = np.clip(y + rng.normal(0, 0.6, 300), 0, 1)
    ci = metrics.bootstrap_ci(y, p, p, p, config.Weights(clean=0.4, adversarial=0.6), n_resamples=200, seed=5)
    assert ci["robust_score"] == pytest.approx(ci["clean_balanced_accuracy"], abs=1e-12)
    assert ci["robust_score"]["high"] - ci["robust_score"]["low"] > 0.02  # an interval, not a point
