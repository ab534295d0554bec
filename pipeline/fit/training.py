"""Fitting: the head on cached features (frozen backbone), the whole model on images, and adversarial fine-tuning
(PGD, N-FGSM or TRADES: :mod:`pipeline.fit.defences`). Each reports per-epoch validation metrics through Keras
callbacks (MLflow, Optuna pruning)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from pipeline import config
from pipeline.fit import defences
from pipeline.judge import metrics
from pipeline.judge.attacks import Attacker
from pipeline.model.inference import batched, forward_fn, to_unit
from pipeline.model.network import build_head, head_classifier
from pipeline.model.twin import compute_twin

log = logging.getLogger(__name__)


@dataclass
class Arrays:
    """Inputs for one fit: images (uint8) or cached features, and 0/1 labels (FAKE = 1)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    _resident: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def resident(self) -> tuple[tf.Tensor, tf.Tensor]:
        """The training features and labels as tensors, made once and shared by every fit on these arrays (the
        tuning trials): a copy per fit would cost time and the features' size in memory each time."""
        if self._resident is None:
            self._resident = (tf.convert_to_tensor(self.x_train, tf.float32),
                              tf.convert_to_tensor(np.asarray(self.y_train, np.float32).reshape(-1, 1)))
        return self._resident


class ValidationScores(keras.callbacks.Callback):
    """Adds ``val_loss`` (cross-entropy, plus the model's regularisation as Keras counts it), ``val_f1`` (FAKE
    positive), ``val_balanced_accuracy`` and ``val_macro_f1`` to each epoch's logs, for early stopping, pruning
    and MLflow: one compiled forward pass over the validation set, not one per consumer."""

    def __init__(self, x_val: np.ndarray, y_val: np.ndarray, batch_size: int):
        super().__init__()
        self.x_val, self.y_val, self.batch_size = x_val, y_val, batch_size
        self._fn = None

    def on_epoch_end(self, epoch, logs=None):
        if self._fn is None:
            self._fn = forward_fn(self.model)
        p = batched(self._fn, self.x_val, self.batch_size)[:, 0] if len(self.x_val) else np.zeros(0)
        if logs is not None:
            scores = metrics.classification(self.y_val, p)
            logs["val_loss"] = metrics.log_loss(self.y_val, p) + sum(float(v) for v in self.model.losses)
            logs["val_accuracy"] = scores["accuracy"]
            logs.update({f"val_{k}": scores[k] for k in ("f1", *metrics.MEASURES)})


class MlflowEpochLogger(keras.callbacks.Callback):
    """Logs every epoch's numbers to the active MLflow run (a trial's child run, or the train run)."""

    def __init__(self, prefix: str = ""):
        super().__init__()
        self.prefix = prefix

    def on_epoch_end(self, epoch, logs=None):
        import mlflow

        values = {f"{self.prefix}{k}": float(v) for k, v in (logs or {}).items() if np.isscalar(v)}
        mlflow.log_metrics({k: v for k, v in values.items() if math.isfinite(v)}, step=epoch)


def _compile(model: keras.Model, learning_rate: float) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy")],
    )


def early_stopping(patience: int) -> keras.callbacks.EarlyStopping:
    return keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)


class HeadTrainer:
    """Trains heads on one set of cached features, any number of times (the tuning trials), through one compiled
    epoch loop traced once.

    A head step on cached features is little arithmetic, so Keras's ``fit`` (a data pipeline per call,
    dispatch per step) would cost more than the steps, and tracing a fresh loop per trial costs about as much as
    an epoch at CIFAKE size (bench/README.md#the-heads-training-loop). Here the features stay resident as one
    tensor, each epoch is one compiled loop over shuffled batches, and one head and optimizer are reset for each fit:
    fresh seeded weights, zeroed optimizer slots, the learning rate and dropout rate held in variables the loop
    reads. Validation runs once an epoch in :class:`ValidationScores` (ahead of the other callbacks, which see ``loss``,
    ``accuracy``, ``val_loss`` and the validation scores as Keras's ``fit`` would give them)."""

    def __init__(self, data: Arrays, l2: float, batch_size: int):
        self.data, self.l2 = data, l2
        self.head = build_head(0.0, l2)
        self.classifier = head_classifier(self.head)
        self.optimizer = adam(1e-3)
        self.optimizer.build(self.head.trainable_variables)
        self._dropout = tf.Variable(0.0, trainable=False, name="dropout_rate")
        self._noise = tf.random.Generator.from_seed(0)
        # The head ends in a logit, so the cross-entropy is taken from it: what Keras's loss on a sigmoid output
        # computes too (it reads the sigmoid's input back).
        self._loss = keras.losses.BinaryCrossentropy(from_logits=True)
        x, y = data.resident()
        n, steps = len(data.x_train), math.ceil(len(data.x_train) / batch_size)
        self.steps = steps

        @tf.function(input_signature=[tf.TensorSpec((n,), tf.int32)])
        def epoch(order):
            loss_sum, right = tf.constant(0.0), tf.constant(0.0)
            for i in tf.range(steps):
                idx = order[i * batch_size : (i + 1) * batch_size]
                xb, yb = tf.gather(x, idx), tf.gather(y, idx)
                loss, logit = self._step(xb, yb)
                loss_sum += loss * tf.cast(tf.shape(idx)[0], tf.float32)
                right += tf.reduce_sum(tf.cast(tf.equal(tf.cast(logit >= 0.0, tf.float32), yb), tf.float32))
            return loss_sum / n, right / n

        self._epoch = epoch

    def _logit(self, x: tf.Tensor) -> tf.Tensor:
        """The head in training mode, its dropout at the rate of this fit."""
        for layer in self.head.layers[1:]:
            if isinstance(layer, keras.layers.Dropout):
                x = tf.nn.experimental.stateless_dropout(x, tf.cast(self._dropout, x.dtype),
                                                         seed=self._noise.make_seeds(1)[:, 0])
            else:
                x = layer(x, training=True)
        return tf.cast(x, tf.float32)

    def _step(self, x: tf.Tensor, y: tf.Tensor):
        weights = self.head.trainable_variables
        with tf.GradientTape() as tape:
            logit = self._logit(x)
            loss = self._loss(y, logit)
            if self.head.losses:
                loss += tf.add_n(self.head.losses)  # the L2 penalty
            scaled = self.optimizer.scale_loss(loss)  # the loss itself unless float16 needs scaling (see adam)
        self.optimizer.apply_gradients(zip(tape.gradient(scaled, weights), weights))
        return loss, logit

    def fit(self, dropout: float, learning_rate: float, epochs: int, callbacks: list[keras.callbacks.Callback] = (),
            seed: int | None = None, verbose: int = 0) -> tuple[keras.Model, dict]:
        """Train a fresh head. Returns it (features -> logit, a head of its own with ``dropout``) and its history.
        ``seed`` fixes its initial weights, shuffling and dropout; None draws one from NumPy's global generator
        (which the stages seed)."""
        if seed is None:
            seed = int(np.random.randint(2**31 - 1))
        head = build_head(dropout, self.l2, seed=seed)
        self.head.set_weights(head.get_weights())  # batch norm's moving statistics included
        for v in self.optimizer.variables:
            v.assign(tf.zeros_like(v))
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):  # its scale starts afresh, not at 0
            self.optimizer.dynamic_scale.assign(self.optimizer.initial_scale)
        self.optimizer.learning_rate = learning_rate
        self._dropout.assign(dropout)
        self._noise.reset_from_seed(seed)
        shuffle = np.random.default_rng(seed)
        n = len(self.data.x_train)

        clf = self.classifier
        hooks = keras.callbacks.CallbackList(
            [ValidationScores(self.data.x_val, self.data.y_val, 4096), *callbacks], add_history=True,
            add_progbar=verbose != 0, model=clf, verbose=verbose, epochs=epochs, steps=self.steps)
        clf.stop_training = False
        hooks.on_train_begin()
        for e in range(epochs):
            hooks.on_epoch_begin(e)
            loss, accuracy = self._epoch(tf.constant(shuffle.permutation(n).astype(np.int32)))
            hooks.on_epoch_end(e, {"loss": float(loss), "accuracy": float(accuracy)})
            if clf.stop_training:
                break
        hooks.on_train_end()  # EarlyStopping may restore its best epoch's weights here
        head.set_weights(self.head.get_weights())
        return head, clf.history.history


def adam(learning_rate: float) -> keras.optimizers.Optimizer:
    """The optimizer of the hand-written training loops: Adam, under the ``mixed_float16`` policy wrapped in dynamic
    loss scaling (float16 gradients of a small loss underflow to zero without it; Keras's ``fit`` adds the wrapper
    itself, these loops must ask). The loops scale the loss with ``scale_loss``: the loss itself for plain Adam."""
    optimizer = keras.optimizers.Adam(learning_rate)
    if keras.mixed_precision.global_policy().name == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def fit_head(data: Arrays, dropout: float, learning_rate: float, l2: float, epochs: int, batch_size: int,
             callbacks: list[keras.callbacks.Callback] = (), verbose: int = 0,
             seed: int | None = None) -> tuple[keras.Model, dict]:
    """Train one head on cached features (see :class:`HeadTrainer`, which several fits on the same features should
    share). Returns the head (features -> logit) and its history (Keras's)."""
    return HeadTrainer(data, l2, batch_size).fit(dropout, learning_rate, epochs, callbacks, seed, verbose)


def image_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool, seed: int,
                  pick: np.ndarray | None = None) -> tf.data.Dataset:
    """uint8 images (possibly a memmap) -> batches of [0, 1] floats, converted per batch, not up front; only the
    images ``pick`` (indices) when given."""
    index = tf.data.Dataset.range(len(x)) if pick is None else tf.data.Dataset.from_tensor_slices(pick.astype(np.int64))
    if shuffle:
        index = index.shuffle(len(x) if pick is None else len(pick), seed=seed, reshuffle_each_iteration=True)

    def load(i):
        i = np.asarray(i)
        return to_unit(x[i]), y[i].astype(np.float32)[:, None]

    spec = (tf.TensorSpec((None, *x.shape[1:]), tf.float32), tf.TensorSpec((None, 1), tf.float32))
    return index.batch(batch_size).map(
        lambda i: tf.numpy_function(load, [i], [tf.float32, tf.float32]), num_parallel_calls=1
    ).map(lambda a, b: (tf.ensure_shape(a, spec[0].shape), tf.ensure_shape(b, spec[1].shape))).prefetch(2)


def fit_model(model: keras.Model, data: Arrays, learning_rate: float, epochs: int, batch_size: int, seed: int,
              callbacks: list[keras.callbacks.Callback] = (), verbose: int = 0) -> dict:
    """Train the whole model on images (used when the backbone is not frozen)."""
    _compile(model, learning_rate)
    history = model.fit(
        image_dataset(data.x_train, data.y_train, batch_size, True, seed),
        epochs=epochs, verbose=verbose, shuffle=False,  # the dataset reshuffles itself each epoch
        callbacks=[ValidationScores(data.x_val, data.y_val, batch_size), *callbacks],
    )
    return history.history


class FineTuned(NamedTuple):
    history: list[dict]  # one row per epoch, epoch 0 (the incoming model) first
    kept: int  # the epoch whose weights the model holds
    # P(FAKE) of the kept model on the validation images, clean and attacked (None for an epoch 0 scored by the
    # caller's ``before``): what its threshold is chosen from, without attacking validation again.
    p_val: tuple[np.ndarray, np.ndarray] | None


def adversarial_finetune(model: keras.Model, data: Arrays, cfg: config.AdvTrain, evaluate_cfg: config.Evaluate,
                         seed: int, on_epoch_end=None, before: dict[str, float] | None = None,
                         attacker: Attacker | None = None) -> FineTuned:
    """Adversarial training by ``cfg.method``: ``pgd`` (Madry et al. 2018, the default; ``cfg.attack`` may also be
    FGSM) and ``n-fgsm`` replace a share ``adv_ratio`` of each batch by its adversarial version, made on the fly
    against the current weights; ``trades`` trains every image clean and attacked (:mod:`pipeline.fit.defences`).
    Each batch: the attack, then one compiled update. Each epoch trains on ``cfg.images_per_epoch`` images (a fresh
    seeded draw; all of them when null).

    The model keeps the weights of the epoch with the best validation :func:`metrics.robust_score` (clean and
    attacked with ``cfg.attack``, whatever the method: a one-step method's epoch that overfits to its own attack
    scores low there). The incoming model is epoch 0 (its scores are measured unless ``before`` gives them), so a
    fine-tune that only hurts changes nothing. A later epoch must also score above always-FAKE's robust_score, the
    registry's floor: an epoch that collapsed to a near-constant answer is never handed on, even when the incoming
    model (broken by the attack) scores below it (bench/README.md#sweeps).
    ``on_epoch_end(epoch, row)`` is called for epochs 1 onward.

    A loop of its own, not Keras's ``fit`` with a ``train_step``: the attack runs on the model's one compiled
    gradient, which a ``train_step`` would trace again with the attack's loop, and the update trains the compute
    twin, not the saved model's slower layers."""
    attacker = attacker or Attacker(model, cfg.attack, seed)
    p_val = None
    if before is None:
        p_val = validation_probabilities(model, attacker, data.x_val, data.y_val, cfg.batch_size)
        before = _scores(data.y_val, p_val, evaluate_cfg)
    optimizer = adam(cfg.learning_rate)
    loss_fn = keras.losses.BinaryCrossentropy()
    trainable = model.trainable_variables
    optimizer.build(trainable)
    twin = compute_twin(model)  # the same variables, faster; the one forward_fn runs

    @tf.function(input_signature=[tf.TensorSpec((None, 32, 32, 3), tf.float32), tf.TensorSpec((None, 1), tf.float32)])
    def update(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, twin(x, training=True))
            if model.losses:
                loss += tf.add_n(model.losses)  # the head's L2 penalty
            scaled = optimizer.scale_loss(loss)
        optimizer.apply_gradients(zip(tape.gradient(scaled, trainable), trainable))
        return loss

    def perturb(x, y):
        return defences.n_fgsm(attacker, cfg, x, y) if cfg.method == "n-fgsm" else attacker.perturb_batch(x, y)

    def step(x, y):
        # The attack runs on the model's one compiled gradient, shared with validation's and evaluate's attacks:
        # compiled into the step it was traced again, with its loop (bench/README.md#attacks).
        n_adv = int(np.round(np.float32(cfg.adv_ratio) * np.float32(len(x))))
        if n_adv == 0:  # never an attack on an empty batch: BatchNormalization fails on zero images under oneDNN
            return update(x, y)
        return update(tf.concat([perturb(x[:n_adv], y[:n_adv]), x[n_adv:]], axis=0), y)

    if cfg.method == "trades":
        step = defences.Trades(model, cfg, optimizer, seed).step

    from tqdm import tqdm

    history, best_epoch, best_score = [{"loss": None, **before}], 0, before["val_robust_score"]
    floor = metrics.reference(data.y_val, evaluate_cfg.weights, evaluate_cfg.measure)["always_fake_robust_score"]
    best_weights = model.get_weights()  # all of them: the head's BatchNormalization statistics move too
    n_train = len(data.x_train) if cfg.images_per_epoch is None else min(cfg.images_per_epoch, len(data.x_train))
    for epoch in range(cfg.epochs):
        losses = []
        pick = None
        if n_train < len(data.x_train):
            pick = np.random.default_rng(seed + epoch).choice(len(data.x_train), n_train, replace=False)
        batches = image_dataset(data.x_train, data.y_train, cfg.batch_size, True, seed + epoch, pick)
        n = math.ceil(n_train / cfg.batch_size)
        for x, y in tqdm(batches, total=n, desc=f"advtrain epoch {epoch + 1}/{cfg.epochs}", leave=False):
            losses.append(float(step(x, y)))
        p_epoch = validation_probabilities(model, attacker, data.x_val, data.y_val, cfg.batch_size)
        row = {"loss": float(np.mean(losses)) if losses else float("nan"), **_scores(data.y_val, p_epoch, evaluate_cfg)}
        log.info("advtrain epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in row.items()})
        history.append(row)
        if row["val_robust_score"] > max(best_score, floor):
            best_epoch, best_score, p_val = epoch + 1, row["val_robust_score"], p_epoch
            best_weights = model.get_weights()
        if on_epoch_end:
            on_epoch_end(epoch + 1, row)
    if best_epoch == 0 and cfg.epochs and max(r["val_robust_score"] for r in history[1:]) <= floor:
        log.warning("advtrain: no epoch scored above always-FAKE's robust_score %.4f; the incoming model is kept",
                    floor)
    model.set_weights(best_weights)
    return FineTuned(history, best_epoch, p_val)


def choose_threshold(rule: config.Threshold, evaluate_cfg: config.Evaluate, y: np.ndarray, p_clean: np.ndarray,
                     p_attacked: np.ndarray | None = None) -> float:
    """A model's decision threshold by ``rule`` from its validation P(FAKE): clean, and attacked when given
    (:func:`metrics.best_threshold`, the selection rule), else ``rule.fixed``."""
    if rule.rule == "fixed":
        return rule.fixed
    return metrics.best_threshold(y, p_clean, p_attacked, evaluate_cfg.weights, evaluate_cfg.measure)


def probabilities_under_diagnostic(model: keras.Model, evaluate_cfg: config.Evaluate, x: np.ndarray, y: np.ndarray,
                                   seed: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """P(FAKE) on validation images, clean and under evaluate's diagnostic attack (8-bit rounded): the strongest
    attack evaluate judges by, so a threshold chosen on these is chosen under what it will be judged by. A threshold
    chosen under a weaker attack (advtrain's own PGD-3) sits where that attack leaves the images and costs balanced
    accuracy under the stronger one. The mission's FGSM is left out: it is the weaker attack on nearly every image
    (the same threshold with or without it: bench/README.md#the-stored-threshold), and without it an edit of the
    mission's attack does not rerun advtrain."""
    return validation_probabilities(model, Attacker(model, evaluate_cfg.diagnostic, seed), x, y, batch_size)


def validation_probabilities(model: keras.Model, attacker: Attacker, x: np.ndarray, y: np.ndarray,
                             batch_size: int, forward=None) -> tuple[np.ndarray, np.ndarray]:
    """P(FAKE) on validation images, clean and attacked (8-bit rounded, as saved): the one place train, advtrain and
    tune compute them. ``forward``: a compiled forward pass of ``model`` already built (default: its own)."""
    from pipeline.judge.attacks import to_uint8

    fn = forward or forward_fn(model)
    return (batched(fn, x, batch_size)[:, 0],
            batched(fn, to_uint8(attacker.perturb(x, y, batch_size)), batch_size)[:, 0])


def diagnostic_scores(y: np.ndarray, p: tuple[np.ndarray, np.ndarray],
                      evaluate_cfg: config.Evaluate) -> dict[str, float]:
    """Validation figures under evaluate's diagnostic attack (:func:`probabilities_under_diagnostic`), at 0.5."""
    m = evaluate_cfg.measure
    return {f"val_diagnostic_{m}": metrics.measure(y, p[1], m), "val_diagnostic_robust_score": metrics.robust_score(
        y, p[0], p[1], evaluate_cfg.weights, m)}


def _scores(y: np.ndarray, p: tuple[np.ndarray, np.ndarray], evaluate_cfg: config.Evaluate) -> dict[str, float]:
    return {f"val_{k}": v for k, v in metrics.scores(y, *p, evaluate_cfg).items()}


def validation_scores(model: keras.Model, attacker: Attacker, x: np.ndarray, y: np.ndarray, batch_size: int,
                      evaluate_cfg: config.Evaluate) -> dict[str, float]:
    """Validation scores, clean and attacked (8-bit rounded, as saved): F1, the class-balanced measure, the
    mission's weighted F1 and the selection rule :func:`metrics.robust_score`."""
    return _scores(y, validation_probabilities(model, attacker, x, y, batch_size), evaluate_cfg)
