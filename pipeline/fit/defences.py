"""The adversarial training methods beside PGD's (params ``advtrain.method``), each written from its paper.

- ``n-fgsm`` (de Jorge et al. 2022, "Make Some Noise"): one gradient step of α from a start drawn uniformly within
  k·ε, and no projection back onto the ε-ball: x' = clip(x + η + α·sign(∇ℓ(x + η)), 0, 1), η ~ U(-kε, kε), with the
  paper's k = 2, α = ε. The noise and the unclipped step are what keep it from catastrophic overfitting, where
  FGSM with a random start (Wong et al. 2020) at the same cost overfits to its own attack.
- ``trades`` (Zhang et al. 2019): minimise ℓ(f(x), y) + β·KL(f(x) ‖ f(x')), with x' the point within ε of x that
  maximises the KL term, found by PGD on it from x + 0.001·N(0, 1) (the paper's β = 6, 10 steps of 0.007 ≈ 2/255).
  Every image trains clean and attacked, so ``adv_ratio`` does not apply.

PGD itself (Madry et al. 2018) is :meth:`pipeline.judge.attacks.Attacker.perturb_batch` with ``advtrain.attack``.
For a binary classifier with logit z, f(x) is the Bernoulli distribution σ(z), so the KL divergence has a closed
form in the two logits (:func:`bernoulli_kl`).
"""
from __future__ import annotations

import keras
import tensorflow as tf

from pipeline import config
from pipeline.judge.attacks import Attacker
from pipeline.model.network import INPUT_SHAPE
from pipeline.model.twin import logits_model


def n_fgsm(attacker: Attacker, cfg: config.AdvTrain, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """N-FGSM's training examples for the batch ``x`` ([0, 1] float32) with 0/1 labels ``y``."""
    y = tf.reshape(tf.cast(y, tf.float32), (-1,))
    eps = cfg.attack.epsilon / 255.0
    noise, step = cfg.n_fgsm.noise * eps, cfg.n_fgsm.step * eps
    start = tf.clip_by_value(x + attacker.rng.uniform(tf.shape(x), -noise, noise), 0.0, 1.0)
    return tf.clip_by_value(start + step * attacker.gradient_sign(start, y), 0.0, 1.0)


def bernoulli_kl(z: tf.Tensor, z_other: tf.Tensor) -> tf.Tensor:
    """KL(σ(z) ‖ σ(z_other)) per element, from the logits (log σ(t) = -softplus(-t)): exact where the
    probabilities saturate."""
    p = tf.sigmoid(z)
    return (p * (tf.nn.softplus(-z_other) - tf.nn.softplus(-z))
            + (1.0 - p) * (tf.nn.softplus(z_other) - tf.nn.softplus(z)))


class Trades:
    """TRADES' training step on ``model`` (through its compute twin's logits, so it trains ``model``'s variables):
    the attack's KL gradient and the update are each compiled once."""

    def __init__(self, model: keras.Model, cfg: config.AdvTrain, optimizer: keras.optimizers.Optimizer, seed: int):
        self.cfg = cfg
        self.rng = tf.random.Generator.from_seed(seed)
        self.spent = 0  # images through the input gradient (the attack's cost)
        logits = logits_model(model)
        trainable = model.trainable_variables
        images = tf.TensorSpec((None, *INPUT_SHAPE), tf.float32)

        @tf.function(input_signature=[images])
        def clean_logits(x):
            return tf.cast(logits(x, training=False), tf.float32)[:, 0]

        @tf.function(input_signature=[images, tf.TensorSpec((None,), tf.float32)])
        def kl_gradient(x_adv, z_clean):
            with tf.GradientTape() as tape:
                tape.watch(x_adv)
                z_adv = tf.cast(logits(x_adv, training=False), tf.float32)[:, 0]
                divergence = tf.reduce_sum(bernoulli_kl(z_clean, z_adv))
            return tape.gradient(divergence, x_adv)

        beta = tf.constant(cfg.trades.beta, tf.float32)

        @tf.function(input_signature=[images, images, tf.TensorSpec((None, 1), tf.float32)])
        def update(x, x_adv, y):
            n = tf.shape(x)[0]
            with tf.GradientTape() as tape:
                # One pass over both halves: the head's batch norm sees clean and attacked images together, as
                # under PGD's mixed batches.
                z = tf.cast(logits(tf.concat([x, x_adv], 0), training=True), tf.float32)[:, 0]
                z_clean, z_adv = z[:n], z[n:]
                natural = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(y[:, 0], z_clean))
                loss = natural + beta * tf.reduce_mean(bernoulli_kl(z_clean, z_adv))
                if model.losses:
                    loss += tf.add_n(model.losses)  # the head's L2 penalty
                scaled = optimizer.scale_loss(loss)
            optimizer.apply_gradients(zip(tape.gradient(scaled, trainable), trainable))
            return loss

        self._clean_logits, self._kl_gradient, self._update = clean_logits, kl_gradient, update

    def attack(self, x: tf.Tensor) -> tf.Tensor:
        """The point within ε of each image of ``x`` that maximises the KL term (PGD on it, labels not needed)."""
        t = self.cfg.trades
        eps = tf.constant(self.cfg.attack.epsilon / 255.0, tf.float32)
        step = tf.constant(t.step_size / 255.0, tf.float32)
        z_clean = self._clean_logits(x)
        x_adv = tf.clip_by_value(x + 0.001 * self.rng.normal(tf.shape(x)), 0.0, 1.0)
        for _ in range(t.steps):
            self.spent += int(x.shape[0])
            x_adv = x_adv + step * tf.sign(self._kl_gradient(x_adv, z_clean))
            x_adv = tf.clip_by_value(tf.clip_by_value(x_adv, x - eps, x + eps), 0.0, 1.0)
        return x_adv

    def step(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """One TRADES update on the batch ``x`` with labels ``y`` of shape (n, 1); returns its loss."""
        return self._update(x, self.attack(x), y)
