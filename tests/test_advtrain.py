"""pipeline.training.adversarial_finetune: it trains, it keeps the epoch with the best robust_score, and it never
keeps a worse model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline import config, model, training
from pipeline.attacks import Attacker, margin_and_gradient

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"


def advtrain_cfg(**over) -> tuple[config.AdvTrain, config.Evaluate]:
    overrides = ["advtrain.trainable_from=null", "advtrain.batch_size=16", "advtrain.learning_rate=0.003"]
    overrides += [f"advtrain.{k}={v}" for k, v in over.items()]
    params = config.load(PARAMS_FILE, overrides)
    return params.advtrain, params.evaluate


@pytest.fixture
def fresh(tiny_model, tiny_model_file):
    """A private copy of the tiny model (fine-tuning must not touch the session's fixture) and its data."""
    x, y = tiny_model.x, tiny_model.y
    return model.load(tiny_model_file), training.Arrays(x, y, x, y)


def test_measures_the_incoming_model_as_epoch_zero(fresh) -> None:
    m, data = fresh
    cfg, evaluate = advtrain_cfg(epochs=0)
    history, best_epoch, _ = training.adversarial_finetune(m, data, cfg, evaluate, 0)
    assert best_epoch == 0 and len(history) == 1
    assert history[0] == {"loss": None, **scores(m, data, cfg, evaluate)}


def scores(m, data, cfg, weights) -> dict[str, float]:
    return training.validation_scores(m, Attacker(m, cfg.attack, 0), data.x_val, data.y_val, cfg.batch_size, weights)


def test_keeps_the_incoming_weights_when_no_epoch_beats_them(fresh) -> None:
    m, data = fresh
    cfg, weights = advtrain_cfg(epochs=2)
    before_weights = m.get_weights()
    unbeatable = {"val_robust_score": 1.0 + 1e-9}
    history, best_epoch, _ = training.adversarial_finetune(m, data, cfg, weights, 0, before=unbeatable)
    assert best_epoch == 0 and len(history) == 3 and history[0]["loss"] is None  # epoch 0 is the incoming model
    assert all(np.isfinite(r["loss"]) for r in history[1:])  # it did train ...
    for a, b in zip(m.get_weights(), before_weights):  # ... and then put everything back, BN statistics included
        np.testing.assert_array_equal(a, b)


def test_keeps_the_best_epoch_and_its_scores(fresh) -> None:
    m, data = fresh
    cfg, weights = advtrain_cfg(epochs=3)
    worst = {"val_robust_score": -1.0}
    seen = []
    history, best_epoch, _ = training.adversarial_finetune(m, data, cfg, weights, 0, before=worst,
                                                        on_epoch_end=lambda epoch, row: seen.append(epoch))
    assert seen == [1, 2, 3]
    best = max(range(1, 4), key=lambda i: history[i]["val_robust_score"])
    assert best_epoch == best
    now = scores(m, data, cfg, weights)
    assert now["val_robust_score"] == pytest.approx(history[best]["val_robust_score"], abs=1e-9)



def test_a_batch_with_no_attacked_share_trains_on_its_clean_images(fresh) -> None:
    # A last batch of one image whose share rounds to 0 (as with adv_ratio 0): no attack on an empty batch, which
    # crashed the backbone's BatchNormalization
    m, data = fresh
    one_left = training.Arrays(data.x_train[:17], data.y_train[:17], data.x_val, data.y_val)  # batches of 16, 1
    cfg, evaluate = advtrain_cfg(epochs=1, adv_ratio=0.5)
    history, _, _ = training.adversarial_finetune(m, one_left, cfg, evaluate, 0, before={"val_robust_score": -1.0})
    assert np.isfinite(history[1]["loss"])


def attacked_balanced_accuracy(m, x: np.ndarray, y: np.ndarray, attack: config.Attack) -> float:
    from pipeline import metrics
    from pipeline.attacks import to_uint8

    x_adv = to_uint8(Attacker(m, attack, 0).perturb(x, y, 64))
    return metrics.measure(y, model.predict_proba(m, x_adv))


# Brightness that separates the classes by more than 2 x 8/255 (conftest.cue_images overlaps them): here a model can
# be robust at 8/255, so how far advtrain gets shows the training, not the data's ceiling.
SEPARATED = ((40, 120), (136, 216))


def test_adversarial_training_repairs_what_the_attack_breaks(graded_model_file) -> None:
    # The graded model leans on a cue that any attack above 4/255 flips (conftest.cue_images); brightness, which
    # it also sees, survives 8/255. Trained on attacked images the head must move to it; trained on clean ones,
    # where the lines already answer everything, it has no reason to. Judged by a stronger attack than the one it
    # trains on (PGD-10 against PGD-3), on images it never saw. With the overlapping brightness of the other tests
    # the outcome spread 0.48-0.66 over seeds here and fell to 0.41 on another CPU: too near the data's ceiling
    # (~0.73) to tell training from luck. Here (seeds 0, 1, 3; AMD Zen 3): 0.41 before, 0.84-0.87 after; trained
    # on clean images instead (adv_ratio 0, the mutation this test must catch): 0.52.
    from tests.conftest import cue_images

    m = model.load(graded_model_file)
    x, y = cue_images(128, seed=0, levels=SEPARATED)
    x_val, y_val = cue_images(32, seed=1, levels=SEPARATED)  # picks the epoch
    x_test, y_test = cue_images(64, seed=2, levels=SEPARATED)  # judges
    cfg, evaluate = advtrain_cfg(epochs=3, batch_size=32, adv_ratio=1.0)
    judge = evaluate.diagnostic.model_copy(update={"steps": 10})  # PGD-10
    assert cfg.attack.name == "pgd" and judge.steps > cfg.attack.steps
    before = attacked_balanced_accuracy(m, x_test, y_test, judge)
    assert before <= 0.45
    training.adversarial_finetune(m, training.Arrays(x, y, x_val, y_val), cfg, evaluate, 0,
                                  before={"val_robust_score": -1.0})
    after = attacked_balanced_accuracy(m, x_test, y_test, judge)
    assert after >= 0.7 and after - before >= 0.3, (before, after)
    # The training step's attack, validation's and the judge's ran on one compiled gradient, traced once.
    assert margin_and_gradient(m).experimental_get_tracing_count() == 1


def test_the_threshold_is_chosen_under_evaluates_diagnostic(graded_model) -> None:
    # advtrain's threshold must be judged as evaluate will judge it: under evaluate.diagnostic (PGD-20), not under
    # advtrain's own weaker attack, nor the mission's FGSM.
    from pipeline.attacks import to_uint8

    cfg, evaluate = advtrain_cfg()
    m, x, y = graded_model.model, graded_model.x[:48], graded_model.y[:48]
    p_clean, p_attacked = training.probabilities_under_diagnostic(m, evaluate, x, y, seed=3, batch_size=16)

    def under(attack: config.Attack) -> np.ndarray:
        return model.predict_proba(m, to_uint8(Attacker(m, attack, 3).perturb(x, y, 16)))

    np.testing.assert_allclose(p_clean, model.predict_proba(m, x), atol=1e-6)
    np.testing.assert_allclose(p_attacked, under(evaluate.diagnostic), atol=1e-6)
    for other in (evaluate.attack, cfg.attack):  # FGSM and the training attack give other probabilities
        assert not np.allclose(p_attacked, under(other), atol=1e-3)
