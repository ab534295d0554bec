"""pipeline.tracking: failing fast on a dead server, the URI override, run tags, the registry's champion alias."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from pipeline import config, tracking
from pipeline.errors import TrackingError

DEAD = "http://127.0.0.1:9"  # the discard port on loopback: nothing listens, nothing leaves the machine


def with_mlflow(params: config.Params, **changes) -> config.Params:
    return params.model_copy(update={"mlflow": params.mlflow.model_copy(update=changes)})


def test_unreachable_server_fails_fast_with_advice(params, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = with_mlflow(params, tracking_uri=DEAD).mlflow
    start = time.monotonic()
    with pytest.raises(TrackingError) as err:
        tracking.setup(cfg)
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert DEAD in msg
    assert "mlflow server" in msg and "MLFLOW_TRACKING_URI" in msg and "sqlite:///" in msg


def test_unreachable_server_from_the_environment_is_named(params, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DEAD + "/")
    with pytest.raises(TrackingError, match=r"127\.0\.0\.1:9"):
        tracking.setup(params.mlflow)


def test_environment_uri_overrides_params(params, mlflow_store, monkeypatch: pytest.MonkeyPatch) -> None:
    # params point at a dead server; the environment (set by the fixture) points at the private store and wins
    cfg = with_mlflow(params, tracking_uri=DEAD).mlflow
    assert tracking.tracking_uri(cfg) == mlflow_store.uri
    assert tracking.setup(cfg) == mlflow_store.uri
    assert mlflow.get_tracking_uri() == mlflow_store.uri
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    assert exp is not None and mlflow.get_experiment(exp.experiment_id).name == cfg.experiment
    # a local store keeps its artifacts beside the database
    assert exp.artifact_location == (mlflow_store.root / "artifacts").resolve().as_uri()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri(cfg) == DEAD


def git(cwd: Path, *args: str) -> str:
    out = subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=cwd,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_stage_run_tags_stage_commit_and_data_hash(params, mlflow_store, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    lock = {"schema": "2.0", "stages": {"fetch": {"cmd": "python src/fetch.py", "outs": [
        {"path": "data/raw", "hash": "md5", "md5": "0123456789abcdef0123456789abcdef.dir", "size": 10, "nfiles": 2},
    ]}}}
    (work / "dvc.lock").write_text(yaml.safe_dump(lock))
    git(work, "init", "-q")
    git(work, "add", "dvc.lock")
    git(work, "commit", "-q", "-m", "lock")
    commit = git(work, "rev-parse", "HEAD")
    monkeypatch.chdir(work)
    p = params.model_copy(update={"paths": params.paths.model_copy(update={"raw": Path("data/raw")})})

    monkeypatch.setenv("DVC_EXP_NAME", "eps4")  # what DVC sets for `dvc exp run`
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", commit)
    with tracking.stage_run("train", p) as run:
        pass
    got = MlflowClient().get_run(run.info.run_id)
    assert got.info.run_name == "train"
    tags = got.data.tags
    assert tags["stage"] == "train"
    assert tags["git_commit"] == commit and tags["mlflow.source.git.commit"] == commit
    assert tags["dvc_data_hash"] == "0123456789abcdef0123456789abcdef.dir"
    assert tags["data_source"] == p.data.source
    assert tags["dvc_experiment"] == "eps4" and tags["dvc_baseline_rev"] == commit
    assert got.data.params["train.epochs"] == str(p.train.epochs)
    assert got.data.params["model.trainable_from"] == "null"
    assert mlflow.get_experiment(got.info.experiment_id).name == mlflow_store.experiment


def test_data_hash_is_unknown_without_a_lock_entry(tmp_path: Path) -> None:
    assert tracking.dvc_data_hash(Path("data/raw"), tmp_path / "dvc.lock") == "unknown"
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    assert tracking.dvc_data_hash(Path("data/raw"), tmp_path / "dvc.lock") == "unknown"


def test_a_server_that_accepts_but_never_answers_fails_within_the_timeout(params, monkeypatch) -> None:
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel accepts connections; nobody ever reads or answers
    uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = with_mlflow(params, tracking_uri=uri, timeout_s=1.5).mlflow
    start = time.monotonic()
    try:
        with pytest.raises(TrackingError, match="did not answer within 1.5 s"):
            tracking.setup(cfg)
    finally:
        silent.close()
    assert time.monotonic() - start < 1.5 + 2


def test_a_server_that_answers_with_an_http_error_is_reachable_and_bounds_last_only_for_start_up(
        params, monkeypatch) -> None:
    """A 401 from an auth proxy (MLflow sends the credentials, the probe does not) or a 404 where /health is
    missing: the server answered, so the probe lets MLflow try. The fail-fast bounds hold for start-up only: a
    stage's later calls (a model upload a server passes on to S3) keep MLflow's retries and timeout."""
    import http.server
    import threading

    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_error(401, "Unauthorized")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    try:
        tracking._check_reachable(uri, 2.0)  # no error: it answered
        start = time.monotonic()
        with pytest.raises(TrackingError, match="cannot be used"):  # MLflow's own call gets the 401, at once
            tracking.setup(with_mlflow(params, tracking_uri=uri, timeout_s=2.0).mlflow)
        assert time.monotonic() - start < 10
    finally:
        server.shutdown()
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ and "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


def test_credentials_in_params_never_reach_the_tracking_store(params, mlflow_store) -> None:
    # the README's shared-study recipe puts a password in tune.storage; every stage logs every param
    params = params.model_copy(update={"tune": params.tune.model_copy(
        update={"storage": "postgresql://optuna:hunter2@db.internal/optuna"})})
    tracking.setup(params.mlflow)
    with mlflow.start_run() as run:
        tracking.log_params(config.flatten(params))
    logged = MlflowClient().get_run(run.info.run_id).data.params
    assert logged["tune.storage"] == "postgresql://optuna:***@db.internal/optuna"
    assert not any("hunter2" in v for v in logged.values())


def test_a_failing_stage_leaves_its_run_failed(params, mlflow_store) -> None:
    with pytest.raises(RuntimeError), tracking.stage_run("train", params) as run:
        raise RuntimeError("boom")
    assert MlflowClient().get_run(run.info.run_id).info.status == "FAILED"


def test_a_run_left_running_by_a_killed_process_is_marked_killed(params, mlflow_store) -> None:
    tracking.setup(params.mlflow)
    code = (f"import os, mlflow; mlflow.set_tracking_uri({mlflow_store.uri!r}); "
            f"mlflow.set_experiment({params.mlflow.experiment!r}); "
            "from pipeline import tracking, config; "
            f"p = config.load({str(Path(__file__).resolve().parents[1] / 'params.yaml')!r}); "
            "run = mlflow.start_run(tags=tracking.run_tags('advtrain', p)); print(run.info.run_id, flush=True); "
            "os.kill(os.getpid(), 9)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == -9, out.stderr[-2000:]  # SIGKILL: nothing could end the run
    run_id = out.stdout.split()[0]
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"
    with tracking.stage_run("advtrain", params) as again:
        pass
    assert MlflowClient().get_run(run_id).info.status == "KILLED"
    assert MlflowClient().get_run(again.info.run_id).info.status == "FINISHED"


def test_a_relative_store_is_the_dvc_workspaces(params, tmp_path: Path, monkeypatch) -> None:
    """A queued `dvc exp run` works in a temporary copy; DVC_ROOT names the workspace it came from, whose store
    `mlflow ui` reads. Absolute URIs and servers are left as they are."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    copy, workspace = tmp_path / "copy", tmp_path / "workspace"
    copy.mkdir()
    monkeypatch.chdir(copy)
    relative = with_mlflow(params, tracking_uri="sqlite:///mlruns/mlflow.db").mlflow
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert tracking.tracking_uri(relative) == f"sqlite:///{copy}/mlruns/mlflow.db"
    monkeypatch.setenv("DVC_ROOT", str(workspace))
    assert tracking.tracking_uri(relative) == f"sqlite:///{workspace}/mlruns/mlflow.db"
    for uri in (f"sqlite:///{tmp_path}/elsewhere.db", "http://127.0.0.1:5000"):
        assert tracking.tracking_uri(with_mlflow(params, tracking_uri=uri).mlflow) == uri
