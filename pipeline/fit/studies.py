"""The Optuna study's bookkeeping: its name, its RDB storage, each worker's sampler seed, and the trials of dead or
silent workers failed so that others retry them.

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
import warnings
from pathlib import Path

import numpy as np
import optuna

from pipeline import config, provenance
from pipeline.errors import TuneError
from pipeline.tracking import process_alive, without_password

log = logging.getLogger(__name__)

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
FAIL = optuna.trial.TrialState.FAIL
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # who runs a trial: its MLflow tag, and what dead-worker checks read
# A live worker claims a trial within milliseconds of creating it; older and nameless, its worker died
# (a minute leaves room for clocks of machines sharing a study to disagree).
UNCLAIMED_S = 60.0
_CLAIM = "worker:"  # + trial number: a study user attribute naming the trial's worker


def study_name(params: config.Params, data_key: str) -> str:
    """A hash of everything the trials' results depend on (search space, model, selection rule, seed, data, and
    the code the trials run), so that a persisted study is resumed only by identical trials."""
    relevant = {
        # The trials read cached features: the code and the engine settings that computed them count too (as set,
        # not as resolved: `auto` is OpenVINO here and TensorFlow on a GPU worker joining from elsewhere).
        "code": provenance.code_digest("pipeline.fit.tuning", "pipeline.fit.features"),
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
    ``sampler_seed:<host>:<pid>`` (:func:`claim` and a trial's MLflow tag name the process that ran it)."""
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


def claim(study: optuna.Study, number: int) -> None:
    """Name this process as trial ``number``'s worker, the moment it starts the trial. Kept in the study's user
    attributes, not the trial's: a retried trial copies its predecessor's, worker and all, and tune.json hands the
    best trial's on."""
    study.set_user_attr(f"{_CLAIM}{number}", WORKER)


def claims(study: optuna.Study) -> dict[int, str]:
    """Each claimed trial's number and its worker (``host:pid``)."""
    return {int(k.removeprefix(_CLAIM)): v for k, v in study.user_attrs.items() if k.startswith(_CLAIM)}


def fail_unclaimed_trials(study: optuna.Study, older_than_s: float = UNCLAIMED_S) -> list[int]:
    """Fail and retry the RUNNING trials that no worker claimed (``optimize`` names a trial's worker the moment it
    starts) within ``older_than_s`` of their creation: their process died between creating the trial and starting
    it. Neither check above sees them (Optuna's stale check skips a trial with no heartbeat on record, and a dead
    local worker is found by the name the trial lacks), so one would hold its slot for ever and the coordinator
    would wait for ever; a kill lands in that gap often, as a trial is created right after the previous one ends.
    Returns the numbers of the trials failed."""
    now, claimed = datetime.datetime.now(), claims(study)
    return [trial.number for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if trial.number not in claimed and trial.datetime_start is not None
            and (now - trial.datetime_start).total_seconds() > older_than_s and _fail_and_retry(study, trial)]


def _fail_and_retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
    """What Optuna does to a stale trial: mark it failed and queue a retry with the same parameters. False when
    another process finished or failed it first."""
    try:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    except (ValueError, optuna.exceptions.UpdateFinishedTrialError):  # finished before we looked, or while
        return False
    failed = study.get_trials(deepcopy=False)[trial.number]  # a study's trials are numbered 0, 1, ... in order
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)(study, failed)
    return True


def fail_dead_local_trials(study: optuna.Study) -> list[int]:
    """What heartbeats do, for storages without them (a journal file, whose workers share one machine): a RUNNING
    trial whose worker process on this machine is gone is marked failed and retried with the same parameters.
    Returns the numbers of the trials failed."""
    host, failed, claimed = socket.gethostname(), [], claims(study)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        where, _, pid = claimed.get(trial.number, "").rpartition(":")
        if where != host or not pid.isdigit() or process_alive(int(pid)):
            continue
        if _fail_and_retry(study, trial):
            failed.append(trial.number)
    return failed
