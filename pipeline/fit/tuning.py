"""Optuna over the head's dropout and learning rate: the objective (one nested MLflow run per trial, pruned on
validation), the loop that runs it in one worker, and the best trial. Where the study lives and how workers
share it: :mod:`pipeline.fit.studies`.
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field

import keras
import numpy as np
import optuna

from pipeline import config
from pipeline.fit.studies import (
    FAIL,
    FINISHED,
    UNCLAIMED_S,
    WORKER,
    claim,
    fail_dead_local_trials,
    fail_unclaimed_trials,
)
from pipeline.fit.training import Arrays, HeadTrainer, MlflowEpochLogger, fit_model, validation_probabilities
from pipeline.judge import metrics
from pipeline.judge.attacks import Attacker
from pipeline.model.inference import batched, forward_fn
from pipeline.model.network import assemble, build_head, build_model, head_classifier

log = logging.getLogger(__name__)


class PruneOnValidation(keras.callbacks.Callback):
    """Reports ``val_<measure>`` (clean validation, both classes counted) to Optuna each epoch and stops a trial
    the pruner gives up on."""

    def __init__(self, trial: optuna.Trial, measure: str):
        super().__init__()
        self.trial, self.key = trial, f"val_{measure}"

    def on_epoch_end(self, epoch, logs=None):
        self.trial.report(float(logs[self.key]), step=epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch} ({self.key} {logs[self.key]:.4f})")


def suggest(trial: optuna.Trial, t: config.Tune) -> dict[str, float]:
    return {
        "dropout": trial.suggest_float("dropout", t.dropout.low, t.dropout.high, log=t.dropout.log),
        "learning_rate": trial.suggest_float("learning_rate", t.learning_rate.low, t.learning_rate.high,
                                             log=t.learning_rate.log),
    }


@dataclass
class Objective:
    """One trial: train with the suggested dropout and learning rate, return the validation score chosen by
    ``tune.objective``: ``clean`` is ``evaluate.measure`` on clean images, ``robust`` is
    :func:`metrics.robust_score` with the validation images attacked white-box (``tune.attack``) against the
    trial's model. Both count the two classes, so a model that calls everything FAKE scores 0.5 and never wins.

    Frozen backbone: ``data`` holds cached features and only a head trains (seconds). Otherwise ``data`` holds
    images and the model trains with its unfrozen layers for ``tune.epochs`` (minutes: keep ``n_trials`` small).
    """

    params: config.Params
    data: Arrays
    backbone: keras.Model | None = None  # frozen mode: the backbone the features came from
    x_val_images: np.ndarray | None = None  # frozen mode, robust objective: the images behind data.x_val
    parent_run_id: str | None = None  # the study's MLflow run, when this process did not open it (a worker)
    _heads: HeadTrainer | None = field(default=None, init=False, repr=False)  # frozen mode: one loop for all trials

    def __call__(self, trial: optuna.Trial) -> float:
        import mlflow

        t, m = self.params.tune, self.params.model
        hp = suggest(trial, t)
        callbacks = [PruneOnValidation(trial, self.params.evaluate.measure), MlflowEpochLogger()]
        if t.patience:  # after the pruner: a trial that stops early has reported its last epoch first
            callbacks.append(keras.callbacks.EarlyStopping(monitor=f"val_{self.params.evaluate.measure}", mode="max",
                                                           patience=t.patience, restore_best_weights=True))
        tags = {"stage": "tune", "optuna.trial": str(trial.number), "worker": WORKER}
        if self.parent_run_id:  # a worker process: nest under the coordinator's run by its id
            tags["mlflow.parentRunId"] = self.parent_run_id
        with mlflow.start_run(run_name=f"trial-{trial.number}", nested=self.parent_run_id is None, tags=tags):
            mlflow.log_params(hp)
            try:
                if m.frozen:
                    if self._heads is None:
                        self._heads = HeadTrainer(self.data, m.l2, t.batch_size)
                    # Seeded by its number: a trial's result depends on its parameters, not on which trials this
                    # process ran before it (a resumed study, several workers).
                    head, _ = self._heads.fit(hp["dropout"], hp["learning_rate"], t.epochs, callbacks,
                                              seed=self.params.base.seed + trial.number)
                    scores = self.score_head(head)
                else:
                    model = build_model(m, hp["dropout"], self.params.base.seed)
                    fit_model(model, self.data, hp["learning_rate"], t.epochs, t.batch_size, self.params.base.seed,
                              callbacks)
                    scores = self.score_model(model, self.data.x_val, forward_fn(model), None)
            except optuna.TrialPruned:
                mlflow.set_tag("optuna.state", "PRUNED")
                raise
            mlflow.log_metrics(scores)
            mlflow.set_tag("optuna.state", "COMPLETE")
        for k, v in scores.items():
            trial.set_user_attr(k, v)
        return scores[t.objective]

    def score_head(self, head: keras.Model) -> dict[str, float]:
        if self.params.tune.objective == "clean":
            p_val = np.asarray(head_classifier(head)(self.data.x_val, training=False))[:, 0]
            return self._scores(p_val)
        model, attacker, forward = self._frozen_scorer()
        model.get_layer("head").set_weights(head.get_weights())  # dropout is inactive at inference
        return self.score_model(model, self.x_val_images, forward, attacker)

    def score_model(self, model: keras.Model, x_val: np.ndarray, forward, attacker: Attacker | None) -> dict:
        y, bs = self.data.y_val, self.params.model.batch_size
        if self.params.tune.objective == "robust":
            attacker = attacker or Attacker(model, self.params.tune.attack, self.params.base.seed)
            return self._scores(*validation_probabilities(model, attacker, x_val, y, bs, forward))
        return self._scores(batched(forward, x_val, bs)[:, 0])

    def _scores(self, p_clean: np.ndarray, p_adv: np.ndarray | None = None) -> dict[str, float]:
        out = metrics.scores(self.data.y_val, p_clean, p_adv, self.params.evaluate)
        out["clean"] = out[self.params.evaluate.measure]
        if p_adv is not None:
            out["robust"] = out["robust_score"]
        return out

    def _frozen_scorer(self):
        """One backbone + head model, its attack and forward pass, compiled once for the whole study: each trial
        loads its head's weights into it instead of tracing ResNet50's gradient again."""
        if not hasattr(self, "_compiled"):
            model = assemble(self.backbone, build_head(0.0, self.params.model.l2), self.params.model.image_size)
            self._compiled = (model, Attacker(model, self.params.tune.attack, self.params.base.seed), forward_fn(model))
        return self._compiled


class _Surplus(Exception):
    """A trial asked for after the study's ``n_trials`` slots were all taken by other workers."""


def optimize(study: optuna.Study, objective: Objective, n_trials: int, wait: bool = True,
             poll_s: float = 1.0, unclaimed_s: float = UNCLAIMED_S) -> int:
    """Run trials in this process until the study holds exactly ``n_trials`` finished (complete or pruned) trials,
    with other processes doing the same on the same study (resuming counts earlier trials). Returns how many this
    process finished now.

    Exactly: trial numbers are handed out by the storage in order, so a trial that finds ``n_trials`` live
    (finished, running or waiting) trials numbered before it is surplus and stops at once, marked failed and
    ``surplus``. A worker killed mid-trial leaves a RUNNING trial that heartbeats (RDB storages) turn into a
    failure and a retry, which the next worker to look picks up; so does a trial whose worker died before it
    started work (``fail_unclaimed_trials``). With ``wait``, this process (the coordinator) stays until the last
    slot is finished, so what it writes afterwards covers all ``n_trials``; a joining worker leaves as soon as
    every slot is taken."""

    ran = 0

    def guarded(trial: optuna.Trial) -> float:
        nonlocal ran
        ahead = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and t.state != FAIL]
        if len(ahead) >= n_trials:
            trial.set_user_attr("surplus", True)
            raise _Surplus(f"trial {trial.number}: the study already has its {n_trials} trials")
        ran += 1  # pruned or complete, it counts; any other error stops this process
        claim(study, trial.number)
        return objective(trial)

    while True:
        trials = study.get_trials(deepcopy=False)
        if sum(t.state in FINISHED for t in trials) >= n_trials:
            return ran
        running = sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)
        if sum(t.state in FINISHED for t in trials) + running >= n_trials and not any(
                t.state == optuna.trial.TrialState.WAITING for t in trials):
            if not wait:
                return ran
            time.sleep(poll_s)  # others hold the last slots; if one dies, its retry comes back as WAITING
            with warnings.catch_warnings():  # trials whose heartbeat stopped (a no-op on storages without one)
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            fail_dead_local_trials(study)  # on this machine a dead worker is seen at once, heartbeat or not
            fail_unclaimed_trials(study, unclaimed_s)
            continue
        # A trial on images builds a ResNet50, reference cycles worth freeing at once; a head trial leaves only a
        # small head behind, and a full collection costs a large share of a head trial once TensorFlow's objects are
        # loaded (bench/README.md#the-heads-training-loop).
        heads_only = isinstance(objective, Objective) and objective.params.model.frozen
        study.optimize(guarded, n_trials=1, catch=(_Surplus,), gc_after_trial=not heads_only)


def best(study: optuna.Study) -> dict:
    """The best trial's params, value and scores, and how far the completed trials spread (``completed``: the
    best, median and worst value, and how many completed; pruned trials stopped early and do not count)."""
    trial = study.best_trial
    values = np.array([t.value for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))])
    spread = {"n": len(values), "best": float(values.max()), "median": float(np.median(values)),
              "worst": float(values.min())}
    return {"dropout": trial.params["dropout"], "learning_rate": trial.params["learning_rate"],
            "value": trial.value, "trial": trial.number, "study": study.study_name, **trial.user_attrs,
            "completed": spread}
