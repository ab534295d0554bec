"""pipeline.fit.defences: N-FGSM and TRADES as their papers define them, each one parameter apart in advtrain
(``advtrain.method``), and every method's epochs kept by their score under ``advtrain.attack`` (PGD), which a
catastrophically overfitted epoch (robust to its own one-step attack, broken by PGD) cannot pass."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from pipeline import config
from pipeline.fit import defences, training
from pipeline.judge.attacks import Attacker
from pipeline.model.inference import to_unit

PARAMS_FILE = Path(__file__).resolve().parents[2] / "params.yaml"
EPS = 8 / 255


def advtrain_cfg(*overrides: str) -> tuple[config.AdvTrain, config.Evaluate]:
    params = config.load(PARAMS_FILE, ["advtrain.trainable_from=null", "advtrain.batch_size=16",
                                       "advtrain.learning_rate=0.003", *overrides])
    return params.advtrain, params.evaluate


def test_n_fgsm_steps_once_from_a_noisy_start_and_does_not_project_back(tiny_model) -> None:
    cfg, _ = advtrain_cfg("advtrain.method=n-fgsm")
    x, y = to_unit(tiny_model.x[::4]), tiny_model.y[::4].astype(np.float32)
    attacker = Attacker(tiny_model.model, cfg.attack, 0)
    moved = np.abs(defences.n_fgsm(attacker, cfg, tf.constant(x), y).numpy() - x)
    assert moved.max() <= 3 * EPS + 1e-6  # within the noise (2 eps) and the step (eps)
    assert (moved > 1.5 * EPS).mean() > 0.05  # not projected back onto the eps-ball
    # without noise it is one signed gradient step of `step` x eps
    still = cfg.model_copy(update={"n_fgsm": cfg.n_fgsm.model_copy(update={"noise": 0.0})})
    fgsm = np.clip(x + EPS * attacker.gradient_sign(tf.constant(x), y).numpy(), 0.0, 1.0)
    np.testing.assert_allclose(defences.n_fgsm(attacker, still, tf.constant(x), y).numpy(), fgsm, atol=1e-7)


def test_bernoulli_kl_is_the_divergence_of_the_two_probabilities_and_stays_finite_when_they_saturate() -> None:
    z, w = np.array([-2.0, 0.0, 0.5, 3.0]), np.array([1.0, 0.0, -1.5, 2.0])
    p, q = 1 / (1 + np.exp(-z)), 1 / (1 + np.exp(-w))
    want = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    np.testing.assert_allclose(defences.bernoulli_kl(tf.constant(z), tf.constant(w)).numpy(), want, rtol=1e-6)
    assert defences.bernoulli_kl(tf.constant([40.0]), tf.constant([-40.0])).numpy()[0] == pytest.approx(40.0)


def test_trades_attack_stays_within_epsilon_and_finds_more_divergence_than_a_random_corner(graded_model) -> None:
    from tests.conftest import cue_images

    cfg, _ = advtrain_cfg("advtrain.method=trades")
    trades = defences.Trades(graded_model.model, cfg, training.adam(1e-3), seed=0)
    x = tf.constant(to_unit(cue_images(16, seed=5)[0]))
    adv = trades.attack(x).numpy()
    assert np.abs(adv - x.numpy()).max() <= EPS + 1e-6 and 0.0 <= adv.min() and adv.max() <= 1.0
    corner = np.clip(x.numpy() + EPS * np.random.default_rng(0).choice([-1.0, 1.0], x.shape), 0, 1).astype(np.float32)
    clean = trades._clean_logits(x)

    def divergence(images) -> float:
        return float(tf.reduce_mean(defences.bernoulli_kl(clean, trades._clean_logits(tf.constant(images)))))

    assert divergence(adv) > 2 * divergence(corner) > 0
    assert trades.spent == len(adv) * cfg.trades.steps


def test_each_method_and_tradess_beta_train_other_weights(monkeypatch) -> None:
    # One batch on a small model of the pipeline's shape (its untrained head's scores do not saturate, so the KL
    # term has a gradient; a ResNet50 would trace each method's step for tens of seconds), from the same weights
    # each time; validation is not what is tested here, so it is a stand-in.
    from tests.conftest import cue_images, small_model

    x, y = cue_images(8, seed=6)
    data = training.Arrays(x, y, x, y)
    monkeypatch.setattr(training, "validation_probabilities",
                        lambda model, attacker, x, y, batch_size: (y.astype(np.float32), y.astype(np.float32)))
    model = small_model()
    start, trained = model.get_weights(), {}
    for name, overrides in {"pgd": [], "n-fgsm": ["advtrain.method=n-fgsm"], "trades": ["advtrain.method=trades"],
                            "trades beta 0": ["advtrain.method=trades", "advtrain.trades.beta=0"]}.items():
        model.set_weights(start)
        cfg, evaluate = advtrain_cfg("advtrain.epochs=1", *overrides)
        history, _, _ = training.adversarial_finetune(model, data, cfg, evaluate, 0, before={"val_robust_score": -1})
        assert np.isfinite(history[1]["loss"]), name
        trained[name] = np.concatenate([w.ravel() for w in model.get_weights()])
    names = list(trained)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not np.allclose(trained[a], trained[b], atol=1e-7), f"{a} and {b} trained the same weights"


@pytest.mark.parametrize("method", ["n-fgsm", "trades"])
def test_epochs_are_kept_by_their_score_under_pgd_so_a_catastrophically_overfitted_one_is_not(
        method: str, monkeypatch) -> None:
    # Validation scores scripted per epoch: the third epoch is broken by the attack it is scored under, as an
    # epoch that overfits to a one-step attack is by PGD (while its own attack would find it robust).
    from tests.conftest import separable_images, small_model

    x, y = separable_images(64)
    data = training.Arrays(x[::8], y[::8], x, y)  # one batch an epoch: training is not what is tested
    flipped = iter([0.4, 0.2, 0.9])  # the share of attacked validation images each epoch gets wrong
    scored_under = []

    def scripted(model, attacker, x, y_val, batch_size):
        scored_under.append(attacker.attack)
        wrong = np.random.default_rng(len(scored_under)).random(len(y_val)) < next(flipped)
        return y_val.astype(np.float32), np.where(wrong, 1 - y_val, y_val).astype(np.float32)

    monkeypatch.setattr(training, "validation_probabilities", scripted)
    cfg, evaluate = advtrain_cfg("advtrain.epochs=3", f"advtrain.method={method}")
    _, best_epoch, _ = training.adversarial_finetune(small_model(), data, cfg, evaluate, 0,
                                                     before={"val_robust_score": -1})
    assert best_epoch == 2
    assert scored_under and all(a == cfg.attack and a.name == "pgd" and a.steps > 1 for a in scored_under)
