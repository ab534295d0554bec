"""MLflow: where runs go, how they are tagged, and the model registry.

DVC owns data and the pipeline; MLflow owns runs, comparisons and model versions. Every run is tagged with its
stage, the git commit and the DVC hash of the data, so a run in ``mlflow ui`` leads back to the exact inputs.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from pipeline import config
from pipeline.errors import TrackingError
from pipeline.io import workspace_root

log = logging.getLogger(__name__)


def tracking_uri(cfg: config.Mlflow) -> str:
    """``MLFLOW_TRACKING_URI`` wins over params. A relative SQLite store is the workspace's (see
    :func:`workspace_root`), so a queued experiment records its runs and versions where ``mlflow ui`` looks, not in
    a copy DVC deletes afterwards."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_absolute():
        uri = f"sqlite:///{workspace_root() / uri.removeprefix('sqlite:///')}"
    return uri


@contextlib.contextmanager
def _store_creation_lock(uri: str) -> Iterator[None]:
    """Several processes creating one SQLite store at once break it for good (README.md#experiments): queued
    experiments (``dvc queue start -j 2``) and tuning workers take this file lock around their
    first access. Once the schema exists, concurrent writers are safe (SQLite waits for its own write lock)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    with open(Path(uri.removeprefix("sqlite:///")).with_suffix(".create-lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_reachable(uri: str, timeout_s: float) -> None:
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as resp:
                resp.read()
        except urllib.error.HTTPError:  # it answered (401 from an auth proxy, 404 without /health): reachable
            return
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(
                f"MLflow tracking server {uri} did not answer within {timeout_s:g} s ({reason}); start it "
                "(`mlflow server`), fix mlflow.tracking_uri / MLFLOW_TRACKING_URI, or use the local "
                "store sqlite:///mlruns/mlflow.db"
            ) from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingError(f"cannot create the MLflow store folder {db.parent}: {err}") from None
        if db.exists() and not os.access(db, os.W_OK):
            raise TrackingError(f"the MLflow store {db} is not writable; fix its permissions or change the URI")


@contextlib.contextmanager
def _fail_fast(timeout_s: float) -> Iterator[None]:
    """No retry storm or long hang against a dead server at start-up: one clear error within seconds. Only here: a
    stage's later calls (a model upload that a server passes on to S3, a metric in a busy hour) keep MLflow's own
    retries and timeout, so that the work before them is not lost to one slow answer."""
    bounds = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(max(timeout_s, 1)))}
    saved = {k: os.environ.get(k) for k in bounds}
    os.environ.update({k: v for k, v in bounds.items() if saved[k] is None})  # a user's own setting wins
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


def setup(cfg: config.Mlflow) -> str:
    """Point MLflow at the store from params (or the environment), fail fast if it is unreachable, select the
    experiment (created with its artifacts under ``mlruns/`` for a local store). Returns the tracking URI."""
    import mlflow

    uri = tracking_uri(cfg)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    _check_reachable(uri, cfg.timeout_s)
    mlflow.set_tracking_uri(uri)
    try:
        with _store_creation_lock(uri), _fail_fast(cfg.timeout_s):
            if mlflow.get_experiment_by_name(cfg.experiment) is None:
                location = None
                if uri.startswith("sqlite:///"):
                    location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
                mlflow.create_experiment(cfg.experiment, artifact_location=location)
            mlflow.set_experiment(cfg.experiment)
    except Exception as err:  # MlflowException, SQLAlchemy errors: the store itself is unusable
        raise TrackingError(f"MLflow store {uri} cannot be used: {err}") from None
    return uri


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dvc_md5(path: Path, lock_file: Path = Path("dvc.lock")) -> str | None:
    """The md5 DVC recorded in dvc.lock for ``path`` or for the output folder holding it (each stage's entry is
    written as soon as it finished); None when no entry covers it."""
    try:
        lock = yaml.safe_load(lock_file.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    path = Path(path)
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            out_path = Path(out.get("path", ""))
            if out.get("md5") and (path == out_path or out_path in path.parents):
                return str(out["md5"])
    return None


def dvc_data_hash(raw_path: Path, lock_file: Path = Path("dvc.lock")) -> str:
    """The md5 DVC recorded for the raw dataset in dvc.lock."""
    return dvc_md5(raw_path, lock_file) or "unknown"


def log_dataset(path: Path, context: str, name: str | None = None) -> None:
    """Record ``path`` as an input of the active run (MLflow's dataset lineage): its DVC md5 as the digest (for a
    folder from dvc.lock; for a file the md5 of its bytes, which is what DVC records) and the path, relative to
    the workspace, as the source. ``context``: training, validation, testing…"""
    import hashlib
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    path = Path(path)
    # A file may be this stage's own output, whose dvc.lock entry is still the previous run's until the stage ends:
    # hash its bytes (DVC's md5 of a file). A folder is an input here, and dvc.lock holds its current hash.
    digest = hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else dvc_md5(path)
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": it is a local path either way
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(path.as_posix())
    mlflow.log_input(MetaDataset(source, name=name or path.name, digest=digest), context=context)


CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}


def log_splits(processed: Path, *splits: str) -> None:
    """The preprocessed splits a stage reads, as the active run's datasets (:func:`log_dataset`)."""
    for split in splits:
        log_dataset(Path(processed) / split, CONTEXTS[split], name=split)


def run_tags(stage: str, params: config.Params) -> dict[str, str]:
    commit = git_commit()
    source = params.data.source
    return {
        "stage": stage,
        "mlflow.source.git.commit": commit,
        "git_commit": commit,
        "dvc_data_hash": dvc_data_hash(params.paths.raw),
        "data_source": source,
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "workspace": str(Path.cwd().resolve()),
        # Set by DVC for `dvc exp run` (queued, --temp or in the workspace): which experiment, branched from where.
        **{tag: os.environ[env] for tag, env in (("dvc_experiment", "DVC_EXP_NAME"),
                                                 ("dvc_baseline_rev", "DVC_EXP_BASELINE_REV")) if env in os.environ},
    }


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine still runs. A child that exited but was not reaped yet (a zombie:
    a coordinator's dead worker) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        pass
    if not Path("/proc/self/stat").exists():  # not Linux: no way to see a zombie, and it is there
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # it exited just now
        return False


def close_abandoned_runs(stage: str) -> list[str]:
    """Mark KILLED the runs of ``stage`` from this workspace that are still RUNNING although their process is gone
    (killed with SIGKILL, or the machine went down): an exception already ends a run as FAILED, a lost process
    cannot. Runs of other hosts or workspaces are left alone. Returns the run ids closed."""
    import mlflow
    from mlflow import MlflowClient

    host, workspace = socket.gethostname(), str(Path.cwd().resolve())
    runs = mlflow.search_runs(filter_string=f"tags.stage = '{stage}' and attributes.status = 'RUNNING'",
                              output_format="list")
    closed = []
    for run in runs:
        tags = run.data.tags
        pid = int(tags.get("pid", "0") or 0)
        if tags.get("host") != host or tags.get("workspace") != workspace or process_alive(pid):
            continue
        MlflowClient().set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
        log.warning("tracking: run %s of stage %s was left RUNNING by a process that is gone: marked KILLED",
                    run.info.run_id, stage)
    return closed


@contextlib.contextmanager
def stage_run(stage: str, params: config.Params, run_name: str | None = None) -> Iterator[Any]:
    """An MLflow run for one stage, opened before its work and closed after it (FAILED if the stage raised),
    tagged for traceability, with every params.yaml value logged."""
    import mlflow

    setup(params.mlflow)
    close_abandoned_runs(stage)
    with mlflow.start_run(run_name=run_name or stage, tags=run_tags(stage, params)) as run:
        log_params(config.flatten(params))  # `base.seed`, as in params.yaml and `dvc exp show`
        yield run


_PASSWORD = re.compile(r"(?<=://)([^/@:\s]*):[^/@\s]*@")


def without_password(text: str) -> str:
    """``postgresql://user:secret@host/db`` as ``postgresql://user:***@host/db``: params and messages are shown and
    stored (the tracking server keeps every run's params), credentials never."""
    return _PASSWORD.sub(r"\1:***@", text)


def log_params(values: dict[str, Any]) -> None:
    """Log params (MLflow batches them itself), credentials in URLs masked, values cut to MLflow's length limit,
    which it would refuse."""
    import mlflow

    mlflow.log_params({k: "null" if v is None else without_password(str(v))[:6000] for k, v in values.items()})
