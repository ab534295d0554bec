"""Optuna over the head's dropout and learning rate, one nested MLflow run per trial.

The study lives in RDB storage (SQLite by default) so an interrupted ``tune`` resumes. Its name is a hash of
everything its trials depend on, so a changed search space, data or model starts a fresh study instead of
mixing in trials from another setting (a persisted study file outlives params edits).
"""
from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

import optuna
from pipeline import config, metrics, provenance
from pipeline.attacks import Attacker, to_uint8
from pipeline.model import assemble, batched, build_head, build_model, forward_fn, head_classifier
from pipeline.training import Arrays, MlflowEpochLogger, fit_head, fit_model

log = logging.getLogger(__name__)
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def study_name(params: config.Params, data_key: str) -> str:
    """A hash of everything the trials' results depend on (search space, model, selection rule, seed, data, and
    the code the trials run), so that a persisted study is resumed only by identical trials."""
    relevant = {
        "code": provenance.code_digest("pipeline.tuning"),
        "tune": params.tune.model_dump(mode="json", exclude={"n_trials", "storage"}),
        "model": params.model.model_dump(mode="json"),
        "weights": params.evaluate.weights.model_dump(mode="json"),
        "measure": params.evaluate.measure,
        "seed": params.base.seed,
        "data": data_key,
    }
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]
    return f"cifake-head-{digest}"


def storage(url: str) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeats: a trial whose worker died is marked failed and retried, not left RUNNING."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.8; they work and we want them
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=30, grace_period=120,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
        )


def make_study(params: config.Params, data_key: str) -> optuna.Study:
    t = params.tune
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=3) if t.pruner == "median"
              else optuna.pruners.NopPruner())
    return optuna.create_study(
        study_name=study_name(params, data_key), storage=storage(t.storage), load_if_exists=True,
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=params.base.seed), pruner=pruner,
    )


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

    def __call__(self, trial: optuna.Trial) -> float:
        import mlflow

        t, m = self.params.tune, self.params.model
        hp = suggest(trial, t)
        callbacks = [PruneOnValidation(trial, self.params.evaluate.measure), MlflowEpochLogger()]
        with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True,
                              tags={"stage": "tune", "optuna.trial": str(trial.number)}):
            mlflow.log_params(hp)
            try:
                if m.frozen:
                    head, _ = fit_head(self.data, hp["dropout"], hp["learning_rate"], m.l2, t.epochs, t.batch_size,
                                       callbacks)
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
        p_clean, p_adv = batched(forward, x_val, bs)[:, 0], None
        if self.params.tune.objective == "robust":
            attacker = attacker or Attacker(model, self.params.tune.attack, self.params.base.seed)
            p_adv = batched(forward, to_uint8(attacker.perturb(x_val, y, bs)), bs)[:, 0]
        return self._scores(p_clean, p_adv)

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


def optimize(study: optuna.Study, objective: Objective, n_trials: int) -> int:
    """Run trials until ``n_trials`` have finished in this study (resuming counts earlier ones). Returns how
    many ran now."""
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    todo = max(0, n_trials - done)
    if todo:
        study.optimize(objective, n_trials=todo, callbacks=[optuna.study.MaxTrialsCallback(n_trials, FINISHED)],
                       gc_after_trial=True)
    return todo


def best(study: optuna.Study) -> dict:
    trial = study.best_trial
    return {"dropout": trial.params["dropout"], "learning_rate": trial.params["learning_rate"],
            "value": trial.value, "trial": trial.number, "study": study.study_name, **trial.user_attrs}
