"""pipeline.judge.attacks: FGSM/PGD budgets, strength on a trained model, logit gradients, 8-bit PNG round trip."""
from __future__ import annotations

import io
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipeline import config
from pipeline.data import filetree
from pipeline.judge import evaluation
from pipeline.judge.attacks import Attacker, to_uint8
from pipeline.model import network, twin


def attack(name: str, epsilon: float, **kw) -> config.Attack:
    return config.Attack(name=name, epsilon=epsilon, **kw)


def logits(m: keras.Model, x: np.ndarray) -> np.ndarray:
    return np.asarray(twin.logits_model(m)(x, training=False), np.float64)[:, 0]


def margin(m: keras.Model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """How far each image sits on its true label's side: +logit for FAKE, -logit for REAL."""
    return np.where(y == 1, 1.0, -1.0) * logits(m, x)


def logit_bce(m: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    """Mean BCE from the logit (softplus of minus the margin), in float64: no clipping, no saturation."""
    return float(np.mean(np.logaddexp(0.0, -margin(m, x, y))))


@pytest.fixture(scope="module")
def batch(tiny_model) -> tuple[np.ndarray, np.ndarray]:
    """24 training images of the tiny model, both classes, as [0, 1] floats."""
    idx = np.r_[0:12, 64:76]
    return tiny_model.x[idx].astype(np.float32) / 255.0, tiny_model.y[idx]


@pytest.fixture(scope="module")
def attackers(tiny_model) -> dict[str, Attacker]:
    """One attacker per kind for the module: each traces ResNet50's input gradient once (seconds)."""
    return {"fgsm": Attacker(tiny_model.model, attack("fgsm", 8)),
            "pgd": Attacker(tiny_model.model, attack("pgd", 8, steps=10, step_size=2), seed=0)}


@pytest.mark.parametrize("name", ["fgsm", "pgd"])
def test_perturbation_stays_within_epsilon_and_pixel_range(attackers, name: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((8, 32, 32, 3), dtype=np.float32)
    x[:, :4] = 0.0  # pixels at the edges of the range: the attack must clip, not overshoot
    x[:, -4:] = 1.0
    y = np.array([0, 1] * 4)
    for eps in (8, 3):
        x_adv = attackers[name].perturb(x, y, batch_size=3, epsilon=eps)
        assert x_adv.shape == x.shape and x_adv.dtype == np.float32
        assert np.abs(x_adv - x).max() <= eps / 255 + 1e-6
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
        assert np.abs(x_adv - x).max() >= eps / 255 - 1e-6  # and it does use its budget


@pytest.mark.parametrize("name", ["fgsm", "pgd"])
def test_epsilon_zero_is_the_identity(attackers, batch, name: str) -> None:
    x, y = batch
    np.testing.assert_array_equal(attackers[name].perturb(x, y, batch_size=16, epsilon=0), x)


@pytest.mark.parametrize("name", ["fgsm", "pgd"])
def test_attack_raises_the_loss_of_a_trained_model(tiny_model, attackers, batch, name: str) -> None:
    x, y = batch
    m = tiny_model.model
    assert np.all(margin(m, x, y) > 0)  # the model gets every clean image right
    x_adv = attackers[name].perturb(x, y, batch_size=16)
    assert logit_bce(m, x_adv, y) > logit_bce(m, x, y)
    # every image, of both classes, is pushed towards the wrong side
    assert np.all(margin(m, x_adv, y) < margin(m, x, y) - 1.0)


def test_pgd_is_at_least_as_strong_as_fgsm(tiny_model, attackers, batch) -> None:
    x, y = batch
    m = tiny_model.model
    for eps in (4, 8):
        fgsm = attackers["fgsm"].perturb(x, y, batch_size=24, epsilon=eps)
        pgd = attackers["pgd"].perturb(x, y, batch_size=24, epsilon=eps)
        loss_fgsm, loss_pgd = logit_bce(m, fgsm, y), logit_bce(m, pgd, y)
        assert loss_pgd >= loss_fgsm * (1 - 1e-3), (eps, loss_pgd, loss_fgsm)
        assert margin(m, pgd, y).mean() <= margin(m, fgsm, y).mean() + 1e-3


def test_pgd_restarts_keep_the_most_damaging_start_per_image(tiny_model, batch) -> None:
    x, y = batch
    m = tiny_model.model
    one = Attacker(m, attack("pgd", 4, steps=2, step_size=1), seed=5).perturb(x, y, batch_size=24)
    three = Attacker(m, attack("pgd", 4, steps=2, step_size=1, restarts=3), seed=5).perturb(x, y, batch_size=24)
    assert np.abs(three - x).max() <= 4 / 255 + 1e-6
    # the first start of both is the same draw; the others can only push each image further, never back
    assert np.all(margin(m, three, y) <= margin(m, one, y) + 1e-4)
    assert margin(m, three, y).mean() < margin(m, one, y).mean()


def test_restarts_need_a_random_start() -> None:
    from pipeline.errors import ConfigError

    with pytest.raises(ValueError, match="restarts"):
        attack("pgd", 8, restarts=2, random_start=False)
    with pytest.raises(ConfigError, match="evaluate.diagnostic"):
        config.load(Path(__file__).resolve().parents[2] / "params.yaml",
                    ["evaluate.diagnostic={name: fgsm, epsilon: 8, restarts: 3}"])


def test_gradient_goes_through_the_logit_when_the_sigmoid_saturates(tiny_model, batch) -> None:
    # A copy of the head with its last layer scaled up: P(FAKE) becomes exactly 1.0 or 0.0 in float32, and even
    # BCE's own gradient with respect to the logit (sigmoid(z) - y) underflows to 0 at these logits.
    head = keras.models.clone_model(tiny_model.head)
    head.set_weights(tiny_model.head.get_weights())
    logit = head.get_layer("logit")
    kernel, bias = logit.get_weights()
    logit.set_weights([kernel * 1e3, bias * 1e3])
    saturated = network.assemble(network.backbone_of(tiny_model.model), head, 32)
    x, y = batch
    p = np.asarray(saturated(x, training=False))[:, 0]
    assert np.all((p == 1.0) | (p == 0.0)) and np.array_equal(p == 1.0, y == 1)
    assert np.abs(logits(saturated, x)).min() > 100

    # The trap: a loss on the probability has no gradient left here.
    xt = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        prob_loss = keras.losses.binary_crossentropy(y[:, None].astype(np.float32), saturated(xt, training=False))
    assert not np.any(np.asarray(tape.gradient(prob_loss, xt)))

    x_adv = Attacker(saturated, attack("fgsm", 8)).perturb(x, y, batch_size=24)
    moved = np.isclose(np.abs(x_adv - x), 8 / 255, atol=1e-6)
    interior = (x >= 8 / 255) & (x <= 1 - 8 / 255)  # where clipping cannot hide a step
    for i in range(len(x)):  # every image, the most confident ones included
        assert moved[i][interior[i]].mean() > 0.9, f"image {i} (label {y[i]}) was not attacked"
    assert np.all(margin(saturated, x_adv, y) < margin(saturated, x, y))


def test_uint8_png_round_trip_keeps_the_perturbation_exactly(attackers, batch, tmp_path: Path) -> None:
    x, y = batch
    x_adv = to_uint8(attackers["fgsm"].perturb(x, y, batch_size=16))
    assert x_adv.dtype == np.uint8
    # 8-bit rounding keeps every pixel within epsilon of the 8-bit original
    x8 = to_uint8(x)
    assert np.abs(x_adv.astype(int) - x8.astype(int)).max() <= 8
    names = [f"{'FAKE' if label else 'REAL'}/{i} ({i + 1}).jpg" for i, label in enumerate(y)]
    names[1] = f"{names[0].split('/')[0]}/0 (1).png"  # a local dataset may hold a.jpg and a.png side by side
    target = tmp_path / "Test_dataset_2.zip"
    evaluation.write_png_set(x_adv, names, target)
    tree = filetree.Tree(target)
    stored = evaluation.png_names(names)
    assert stored[:2] == [f"{names[0]}.png", f"{names[1]}.png"] and stored[2] == names[2][:-4] + ".png"
    assert sorted(tree.names()) == sorted(stored)  # one entry per image, none overwritten
    for img, name in zip(x_adv, stored):
        with Image.open(io.BytesIO(tree.read(name))) as f:
            assert f.format == "PNG" and f.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(f), img)
    assert sorted({n.split("/")[0] for n in tree.names()}) == ["FAKE", "REAL"]


def test_to_uint8_rounds_and_clips() -> None:
    got = to_uint8(np.array([-0.1, 0.0, 0.5 / 255, 1.49 / 255, 1.51 / 255, 1.0, 1.2], np.float32))
    np.testing.assert_array_equal(got, [0, 0, 0, 1, 2, 255, 255])


@pytest.mark.parametrize("name", ["fgsm", "pgd"])
def test_sweeping_epsilons_and_batch_sizes_does_not_retrace(attackers, batch, name: str) -> None:
    x, y = batch
    attacker = attackers[name]
    for eps, bs in ((1, 24), (2, 10), (4.5, 7), (16, 24)):
        x_adv = attacker.perturb(x, y, batch_size=bs, epsilon=eps)
        assert np.abs(x_adv - x).max() <= eps / 255 + 1e-6
    assert attacker.gradient.experimental_get_tracing_count() == 1


def test_uint8_input_is_attacked_in_unit_pixel_space(attackers, batch) -> None:
    x, y = batch
    x8 = to_uint8(x)
    attacker = attackers["fgsm"]
    np.testing.assert_allclose(attacker.perturb(x8, y, 24), attacker.perturb(x8.astype(np.float32) / 255, y, 24),
                               atol=1e-6)


def test_fgsm_sweep_matches_one_attack_per_epsilon_from_one_gradient_pass(attackers, batch) -> None:
    x8, y = to_uint8(batch[0]), batch[1]
    attacker = attackers["fgsm"]
    swept = attacker.sweep(x8, y, [1, 4, 16], batch_size=10)
    assert list(swept) == [1, 4, 16]
    for eps, got in swept.items():
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, to_uint8(attacker.perturb(x8, y, 10, epsilon=eps)))
    assert attacker.gradient.experimental_get_tracing_count() == 1


def test_pgd_sweep_runs_the_attack_at_each_epsilon(attackers, batch) -> None:
    x8, y = to_uint8(batch[0]), batch[1]
    swept = attackers["pgd"].sweep(x8, y, [2, 8], batch_size=24)
    for eps, got in swept.items():
        assert np.abs(got.astype(int) - x8.astype(int)).max() <= eps
    assert np.abs(swept[8].astype(int) - x8.astype(int)).max() > 2


def test_to_uint8_gives_8_bit_pixels_and_project_keeps_the_ball_and_the_pixel_range() -> None:
    assert to_uint8(np.array([0.5])).dtype == np.uint8
    from pipeline.judge.attacks import _project

    x = np.array([0.99, 0.01, 0.5, 0.5], np.float32)
    v = np.array([1.5, -0.5, 0.1, 0.9], np.float32)
    np.testing.assert_allclose(_project(v, x, np.float32(0.03)), [1.0, 0.0, 0.47, 0.53], rtol=0, atol=1e-7)
