"""Optuna over the head's dropout and learning rate, one nested MLflow run per trial.

The study lives in RDB storage (SQLite by default) so an interrupted ``tune`` resumes. Its name is a hash of
everything its trials depend on, so a changed search space, data or model starts a fresh study instead of
mixing in trials from another setting (a persisted study file outlives params edits).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import optuna

from pipeline import config, metrics, provenance
from pipeline.attacks import Attacker
from pipeline.errors import TuneError
from pipeline.model import assemble, batched, build_head, build_model, forward_fn, head_classifier
from pipeline.tracking import process_alive, without_password
from pipeline.training import Arrays, HeadTrainer, MlflowEpochLogger, fit_model, validation_probabilities

log = logging.getLogger(__name__)
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
FAIL = optuna.trial.TrialState.FAIL
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # who runs a trial: its MLflow tag, and what dead-worker checks read
# A live worker names itself on a trial within milliseconds of creating it; older and nameless, its worker died
# (a minute leaves room for clocks of machines sharing a study to disagree).
UNCLAIMED_S = 60.0


def study_name(params: config.Params, data_key: str) -> str:
    """A hash of everything the trials' results depend on (search space, model, selection rule, seed, data, and
    the code the trials run), so that a persisted study is resumed only by identical trials."""
    relevant = {
        # The trials read cached features: the code and the engine settings that computed them count too (as set,
        # not as resolved: `auto` is OpenVINO here and TensorFlow on a GPU worker joining from elsewhere).
        "code": provenance.code_digest("pipeline.tuning", "pipeline.features"),
        "inference": [params.inference.engine, params.inference.precision],
        "tune": params.tune.model_dump(mode="json", exclude={"n_trials", "storage", "workers", "heartbeat"}),
        "model": params.model.model_dump(mode="json"),
        "weights": params.evaluate.weights.model_dump(mode="json"),
        "measure": params.evaluate.measure,
        "seed": params.base.seed,
        "data": data_key,
    }
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]
    return f"cifake-head-{digest}"


def storage(url: str, heartbeat: config.Heartbeat | None = None) -> optuna.storages.BaseStorage:
    """The study's storage from ``tune.storage``: ``journal:///<file>`` (Optuna's journal file, for several
    processes on one machine) or any SQLAlchemy URL (``sqlite:///…``, ``postgresql://…`` across machines). RDB
    storages get heartbeats: a trial whose worker died is marked failed and retried, not left RUNNING forever."""
    heartbeat = heartbeat or config.Heartbeat()
    if url.startswith("journal:///"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.8; they work and we want them
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=heartbeat.interval_s, grace_period=heartbeat.grace_s,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
            )
        except ImportError as err:  # e.g. postgresql:// without psycopg
            raise TuneError(f"tune.storage {without_password(url)!r}: its database driver is missing ({err}); for "
                            "PostgreSQL: pip install psycopg[binary]") from None
        except Exception as err:  # sqlalchemy OperationalError and friends: the server is not there
            raise TuneError(f"tune.storage {without_password(url)!r} cannot be used: "
                            f"{without_password(str(err).splitlines()[0])}") from None


def sampler_seed(seed: int, worker: int, opened_after: int = 0) -> int:
    """The TPE sampler's seed of a process that opens the study as worker ``worker`` (0: the coordinator) when it
    holds ``opened_after`` trials. The coordinator of a fresh study keeps ``base.seed``, so a study run by one
    process is seed-exact; every other process derives its own, since processes sharing one seed draw the same
    random start-up trials (and later the same proposals from the same history). That includes a coordinator or
    local worker resuming a study: its sampler starts over, and with its earlier seed it would repeat its earlier
    trials. A (worker, opened_after) pair can come back only when the process that held it proposed nothing."""
    if worker == 0 and opened_after == 0:
        return seed
    return int(np.random.SeedSequence([seed, worker, opened_after]).generate_state(1)[0])


def _pruner(params: config.Params) -> optuna.pruners.BasePruner:
    # From the second epoch on, a trial behind the median of earlier trials at that epoch stops: on cached features
    # a head's first epochs already rank it (bench/README.md#the-heads-training-loop).
    return (optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1) if params.tune.pruner == "median"
            else optuna.pruners.NopPruner())


def _open(params: config.Params, data_key: str, worker: int,
          store: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """The study with this process's own sampler: its seed depends on the trials already there, so the study is
    looked at first, then opened with that sampler; the seed is logged and kept as a study user attr
    ``sampler_seed:<host>:<pid>`` (a trial's ``worker`` system attr and MLflow tag name the process that ran it)."""
    store, name = store or storage(params.tune.storage, params.tune.heartbeat), study_name(params, data_key)
    opened_after = len(optuna.load_study(study_name=name, storage=store).get_trials(deepcopy=False))
    seed = sampler_seed(params.base.seed, worker, opened_after)
    study = optuna.load_study(study_name=name, storage=store, sampler=optuna.samplers.TPESampler(seed=seed),
                              pruner=_pruner(params))
    study.set_user_attr(f"sampler_seed:{WORKER}", seed)
    log.info("tune: %s (%s) samples with TPE seed %d; the study held %d trials", WORKER,
             "the coordinator" if worker == 0 else f"worker {worker}", seed, opened_after)
    return study


def make_study(params: config.Params, data_key: str) -> optuna.Study:
    """Create the study (or open it to resume) as its coordinator (worker 0). Run this once, in one process, before
    any worker starts: creating a fresh store from several processes at once breaks it."""
    store = storage(params.tune.storage, params.tune.heartbeat)
    optuna.create_study(study_name=study_name(params, data_key), storage=store, load_if_exists=True,
                        direction="maximize")
    return _open(params, data_key, 0, store)


def join_study(params: config.Params, data_key: str, worker: int) -> optuna.Study:
    """Open the study a coordinator (``python src/tune.py``) created, to add trials to it from another process;
    ``worker`` (not 0, the coordinator's) seeds its sampler apart from every other worker's."""
    try:
        return _open(params, data_key, worker)
    except KeyError:
        raise TuneError(f"no study {study_name(params, data_key)} in {without_password(params.tune.storage)}: start "
                        "the coordinator first (dvc repro tune, or python src/tune.py), with the same params, data "
                        "and code") from None


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
        study._storage.set_trial_system_attr(trial._trial_id, "worker", WORKER)  # best() hands user attrs on
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
            if optuna.storages._heartbeat.is_heartbeat_enabled(study._storage):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)
            else:
                fail_dead_local_trials(study)
            fail_unclaimed_trials(study, unclaimed_s)
            continue
        # A trial on images builds a ResNet50, reference cycles worth freeing at once; a head trial leaves only a
        # small head behind, and a full collection costs a large share of a head trial once TensorFlow's objects are
        # loaded (bench/README.md#the-heads-training-loop).
        heads_only = isinstance(objective, Objective) and objective.params.model.frozen
        study.optimize(guarded, n_trials=1, catch=(_Surplus,), gc_after_trial=not heads_only)


def fail_unclaimed_trials(study: optuna.Study, older_than_s: float = UNCLAIMED_S) -> list[int]:
    """Fail and retry the RUNNING trials that no worker claimed (``optimize`` names a trial's worker the moment it
    starts) within ``older_than_s`` of their creation: their process died between creating the trial and starting
    it. Neither check above sees them (Optuna's stale check skips a trial with no heartbeat on record, and a dead
    local worker is found by the name the trial lacks), so one would hold its slot for ever and the coordinator
    would wait for ever; a kill lands in that gap often, as a trial is created right after the previous one ends.
    Returns the numbers of the trials failed."""
    now = datetime.datetime.now()
    return [trial.number for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if "worker" not in trial.system_attrs and trial.datetime_start is not None
            and (now - trial.datetime_start).total_seconds() > older_than_s and _fail_and_retry(study, trial)]


def _fail_and_retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
    """What Optuna does to a stale trial: mark it failed and queue a retry with the same parameters. False when
    another process finished or failed it first."""
    try:
        if not study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)(study, study._storage.get_trial(trial._trial_id))
    return True


def fail_dead_local_trials(study: optuna.Study) -> list[int]:
    """What heartbeats do, for storages without them (a journal file, whose workers share one machine): a RUNNING
    trial whose worker process on this machine is gone is marked failed and retried with the same parameters.
    Returns the numbers of the trials failed."""
    host, failed = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        where, _, pid = str(trial.system_attrs.get("worker", "")).rpartition(":")
        if where != host or not pid.isdigit() or process_alive(int(pid)):
            continue
        if _fail_and_retry(study, trial):
            failed.append(trial.number)
    return failed


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
