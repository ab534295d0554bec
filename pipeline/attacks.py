"""White-box L∞ attacks in pixel space [0, 1]: FGSM and PGD, untargeted, against the true labels.

Epsilon and step size are in 8-bit pixel units (``epsilon: 8`` is 8/255). The steps follow binary cross-entropy's
gradient sign, taken through the model's logit (see ``_loss``): differentiating the sigmoid output instead gives
zero gradients once it saturates, and the attack silently does nothing. Each step is one compiled ``tf.function``
over a whole batch; epsilon is a tensor argument, so sweeping a list of epsilons never re-traces. PGD with
``restarts`` > 1 runs from several random starts and keeps, per image, the one that did the most damage.
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from pipeline import config
from pipeline.model import INPUT_SHAPE, logits_model, to_unit


def _loss(logits_fn, x, y):
    logits = tf.cast(logits_fn(x, training=False), tf.float32)
    # Not BCE itself: its gradient (sigmoid(z) - y) underflows to exactly 0 in float32 once |z| > ~88, and the
    # most confident images would silently go unattacked. Only the sign of the input gradient is used and each
    # image's logit depends on that image alone, so the margin -(2y - 1)·z gives the same steps as BCE wherever
    # BCE's gradient is non-zero, and never vanishes.
    return tf.reduce_sum((1.0 - 2.0 * y) * logits)


def _per_image_loss(logits_fn, x, y):
    return (1.0 - 2.0 * y[:, 0]) * tf.cast(logits_fn(x, training=False), tf.float32)[:, 0]


def input_gradient_sign(logits_fn, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = _loss(logits_fn, x, y)
    return tf.sign(tape.gradient(loss, x))


class Attacker:
    """Perturbs batches against ``model`` (a pixels -> P(FAKE) classifier from :mod:`pipeline.model`)."""

    def __init__(self, model: keras.Model, attack: config.Attack, seed: int = 0):
        self.attack = attack
        self.logits = logits_model(model)
        self.rng = tf.random.Generator.from_seed(seed)
        x_spec = tf.TensorSpec((None, *INPUT_SHAPE), tf.float32)
        y_spec = tf.TensorSpec((None, 1), tf.float32)
        scalar = tf.TensorSpec((), tf.float32)
        self._fgsm = tf.function(self._fgsm_step, input_signature=[x_spec, y_spec, scalar])
        self._pgd = tf.function(self._pgd_restarts, input_signature=[x_spec, y_spec] + [scalar] * 5)
        self._sign = tf.function(lambda x, y: input_gradient_sign(self.logits, x, y), input_signature=[x_spec, y_spec])

    def _fgsm_step(self, x, y, eps):
        return tf.clip_by_value(x + eps * input_gradient_sign(self.logits, x, y), 0.0, 1.0)

    def _pgd_attack(self, x, y, eps, step, steps, random_start):
        start = x + random_start * self.rng.uniform(tf.shape(x), -eps, eps)
        x_adv = tf.clip_by_value(start, 0.0, 1.0)
        for _ in tf.range(tf.cast(steps, tf.int32)):
            x_adv = x_adv + step * input_gradient_sign(self.logits, x_adv, y)
            x_adv = tf.clip_by_value(tf.clip_by_value(x_adv, x - eps, x + eps), 0.0, 1.0)
        return x_adv

    def _pgd_restarts(self, x, y, eps, step, steps, random_start, restarts):
        best = self._pgd_attack(x, y, eps, step, steps, random_start)
        best_loss = _per_image_loss(self.logits, best, y)
        for _ in tf.range(tf.cast(restarts, tf.int32) - 1):
            x_adv = self._pgd_attack(x, y, eps, step, steps, random_start)
            loss = _per_image_loss(self.logits, x_adv, y)
            better = loss > best_loss
            best = tf.where(better[:, None, None, None], x_adv, best)
            best_loss = tf.maximum(loss, best_loss)
        return best

    def in_graph(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """The configured attack on one batch, for use inside another compiled function (a training step)."""
        a = self.attack
        eps = tf.constant(a.epsilon / 255.0)
        if a.name == "fgsm":
            return self._fgsm_step(x, y, eps)
        return self._pgd_restarts(x, y, eps, tf.constant(a.step_size / 255.0), tf.constant(float(a.steps)),
                                  tf.constant(float(a.random_start)), tf.constant(float(a.restarts)))

    def perturb_batch(self, x: np.ndarray | tf.Tensor, y: np.ndarray | tf.Tensor, epsilon: float | None = None):
        """One batch: ``x`` in [0, 1] float32, ``y`` 0/1 labels; returns a float32 tensor in [0, 1]."""
        a = self.attack
        eps = tf.constant((a.epsilon if epsilon is None else epsilon) / 255.0, tf.float32)
        x = tf.convert_to_tensor(x, tf.float32)
        y = tf.reshape(tf.cast(y, tf.float32), (-1, 1))
        if a.name == "fgsm":
            return self._fgsm(x, y, eps)
        return self._pgd(
            x, y, eps, tf.constant(a.step_size / 255.0), tf.constant(float(a.steps)),
            tf.constant(float(a.random_start)), tf.constant(float(a.restarts)),
        )

    def perturb(self, x: np.ndarray, y: np.ndarray, batch_size: int, epsilon: float | None = None,
                progress: str | None = None) -> np.ndarray:
        """The whole set, batch by batch; ``x`` uint8 or [0, 1] float. Returns float32 in [0, 1]."""
        from tqdm import tqdm

        out = np.empty((len(x), *INPUT_SHAPE), np.float32)
        starts = range(0, len(x), batch_size)
        for i in tqdm(starts, desc=progress, unit="batch", leave=False, disable=progress is None):
            out[i : i + batch_size] = self.perturb_batch(to_unit(x[i : i + batch_size]), y[i : i + batch_size], epsilon)
        return out

    def signs(self, x: np.ndarray, y: np.ndarray, batch_size: int, progress: str | None = None) -> np.ndarray:
        """The sign of each image's input gradient (int8): FGSM's step at every epsilon."""
        from tqdm import tqdm

        signs = np.empty((len(x), *INPUT_SHAPE), np.int8)
        starts = range(0, len(x), batch_size)
        for i in tqdm(starts, desc=progress, unit="batch", leave=False, disable=progress is None):
            yb = tf.reshape(tf.cast(y[i : i + batch_size], tf.float32), (-1, 1))
            signs[i : i + batch_size] = self._sign(tf.constant(to_unit(x[i : i + batch_size])), yb).numpy()
        return signs

    def sweep(self, x: np.ndarray, y: np.ndarray, epsilons: list[float], batch_size: int,
              progress: str | None = None, signs: np.ndarray | None = None) -> dict[float, np.ndarray]:
        """The attacked set at each epsilon, as uint8 (what a PNG holds).

        FGSM's step direction, the sign of the input gradient at ``x``, does not depend on epsilon: one gradient
        pass (or the ``signs`` already computed for ``x``) serves the whole list, where PGD needs a full attack
        per epsilon."""
        if self.attack.name != "fgsm":
            return {e: to_uint8(self.perturb(x, y, batch_size, e, progress)) for e in epsilons}
        if signs is None:
            signs = self.signs(x, y, batch_size, progress)
        unit = to_unit(x)
        return {e: to_uint8(np.clip(unit + np.float32(e / 255.0) * signs, 0.0, 1.0)) for e in epsilons}


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Round [0, 1] floats to 8-bit pixels, as writing a PNG does: metrics are computed on exactly what is saved."""
    return np.clip(np.rint(np.asarray(x) * 255.0), 0, 255).astype(np.uint8)
