"""DVC experiments as their users run them, on a tiny copy of the repository with the default local MLflow store:
queued experiments run two at a time, `--temp` runs, `dvc exp show`, `dvc exp apply` and MLflow's lineage (datasets,
metrics linked to the model they score, input examples). And: a stage runs the code of the checkout it runs in.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_e2e import _copy_repo, _ran, _repro

pytestmark = pytest.mark.slow
STORE = "mlruns/mlflow.db"  # params.yaml's relative store: the workspace's, never a queued copy's
EXPERIMENTS = {"eps1": 1, "eps16": 16}


def _run(*cmd: str, cwd: Path, env: dict, timeout: float = 900) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout


def _wait_for_queue(root: Path, env: dict, timeout_s: float = 1200) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = _run("dvc", "queue", "status", cwd=root, env=env)
        if not any(word in status for word in ("Queued", "Running")):
            return status
        time.sleep(3)
    _run("dvc", "queue", "kill", *EXPERIMENTS, cwd=root, env=env)
    raise AssertionError(f"the queue did not finish within {timeout_s:.0f} s:\n{status}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A clone after the default run, `dvc.lock` committed: what the README's first command leaves."""
    root = tmp_path_factory.mktemp("experiments") / "repo"
    _copy_repo(root)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHON=sys.executable)
    _repro(root, env)
    _run("git", "add", "dvc.lock", cwd=root, env=env)
    _run("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "default run", cwd=root, env=env)
    return root, env


def _client(root: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / STORE}")


def _evaluate_runs(root: Path) -> dict[str, object]:
    client = _client(root)
    experiment = client.get_experiment_by_name("cifake")
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'evaluate'")
    return {r.data.tags.get("dvc_experiment", ""): r for r in runs}


def test_queued_experiments_run_two_at_a_time_into_the_workspace_store(workspace):
    root, env = workspace
    for name, epsilon in EXPERIMENTS.items():
        _run("dvc", "exp", "run", "--queue", "-S", f"evaluate.attack.epsilon={epsilon}", "-n", name, cwd=root, env=env)
    _run("dvc", "queue", "start", "-j", "2", cwd=root, env=env)
    status = _wait_for_queue(root, env)
    assert status.count("Success") == len(EXPERIMENTS), status

    runs = _evaluate_runs(root)
    assert set(EXPERIMENTS) <= set(runs), f"evaluate runs by experiment: {sorted(runs)}"
    head = _run("git", "rev-parse", "HEAD", cwd=root, env=env).strip()
    for name, epsilon in EXPERIMENTS.items():
        run = runs[name]
        assert run.info.status == "FINISHED"
        assert float(run.data.params["evaluate.attack.epsilon"]) == epsilon  # no redundant `params.` prefix
        assert run.data.tags["dvc_baseline_rev"] == head
        # The copy read the workspace's evaluation passes (DVC_ROOT): only the epsilon's own passes ran again.
        for model in ("baseline", "advtrained"):
            cached = set(run.data.tags[f"cached_{model}"].split(", "))
            assert {"clean", "diagnostic", "apgd", "square", "corruption"} <= cached and "attack" not in cached
    scores = {name: runs[name].data.metrics["adversarial.balanced_accuracy"] for name in EXPERIMENTS}
    aucs = {name: runs[name].data.metrics["adversarial.roc_auc"] for name in EXPERIMENTS}
    assert aucs["eps1"] > aucs["eps16"], (scores, aucs)  # the compare view has something to show
    client = _client(root)
    still_running = client.search_runs([client.get_experiment_by_name("cifake").experiment_id],
                                       "attributes.status = 'RUNNING'")
    assert not still_running, [(r.info.run_name, r.data.tags.get("dvc_experiment")) for r in still_running]

    shown = json.loads(_run("dvc", "exp", "show", "--json", cwd=root, env=env))
    experiments = {e["name"]: e for entry in shown for e in (entry.get("experiments") or [])}
    for name in EXPERIMENTS:
        metrics = experiments[name]["revs"][0]["data"]["metrics"]["metrics/evaluate.json"]["data"]
        assert {"weighted_f1", "robust_score"} <= set(metrics)
        assert "balanced_accuracy" in metrics["adversarial"]

    # both experiments' plots on one page that needs no network (the inlined Vega template)
    page_dir = root.parent / "plots-diff"
    _run("dvc", "plots", "diff", *EXPERIMENTS, "-o", str(page_dir), cwd=root, env=env)
    page = (page_dir / "index.html").read_text()
    assert "vegaEmbed" in page and all(name in page for name in EXPERIMENTS)
    assert not re.findall(r"""<(?:script|link|img)[^>]+(?:src|href)\s*=\s*["']?(?:https?:)?//""", page, re.I)

    # keeping one: its outputs come back from the cache, and nothing needs to run
    _run("dvc", "exp", "apply", "eps1", cwd=root, env=env)
    assert yaml.safe_load((root / "params.yaml").read_text())["evaluate"]["attack"]["epsilon"] == 1
    assert _ran(_repro(root, env)) == set()


def test_a_temp_experiment_records_into_the_workspace_store(workspace):
    root, env = workspace
    _run("dvc", "exp", "run", "--temp", "-S", "evaluate.attack.epsilon=2", "-n", "tmp2", cwd=root, env=env)
    run = _evaluate_runs(root)["tmp2"]
    assert run.info.status == "FINISHED" and float(run.data.params["evaluate.attack.epsilon"]) == 2
    assert not list(root.glob(".dvc/tmp/exps/**/mlruns/mlflow.db")), "a store was created inside the copy"


def test_lineage_datasets_linked_metrics_and_input_examples(workspace):
    import mlflow

    root, _ = workspace
    client = _client(root)
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    processed_md5 = next(o["md5"] for o in lock["preprocess"]["outs"] if o["path"] == "data/processed")
    # the evaluate run whose outputs the workspace holds now (an experiment applied above, or the default run)
    epsilon = yaml.safe_load((root / "params.yaml").read_text())["evaluate"]["attack"]["epsilon"]
    experiment = client.get_experiment_by_name("cifake").experiment_id
    run = client.search_runs([experiment], "tags.stage = 'evaluate'", order_by=["attributes.start_time DESC"])
    run = next(r for r in run if float(r.data.params["evaluate.attack.epsilon"]) == epsilon)
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert inputs["test"].dataset.digest == processed_md5
    assert json.loads(inputs["test"].dataset.source)["uri"] == "data/processed/test"
    attacked_md5 = next(o["md5"] for o in lock["evaluate"]["outs"] if o["path"] == "data/Test_dataset_2.zip")
    assert inputs["Test_dataset_2"].dataset.digest == attacked_md5  # the md5 DVC recorded for it afterwards
    assert {t.key: t.value for t in inputs["Test_dataset_2"].tags}["mlflow.data.context"] == "testing-attacked"

    for info_file, prefix in (("models/model_adv.json", ""), ("models/model.json", "baseline.")):
        info = json.loads((root / info_file).read_text())
        logged = client.get_logged_model(info["model_id"])
        linked = {m.key: m.value for m in logged.metrics or [] if m.run_id == run.info.run_id}
        assert linked[f"{prefix}robust_score"] == pytest.approx(run.data.metrics[f"{prefix}robust_score"])
        version = client.get_model_version(info["registered_model"], info["version"])
        assert version.source == f"models:/{info['model_id']}"  # the registered version is that logged model
        mlflow.set_tracking_uri(f"sqlite:///{root / STORE}")
        example = mlflow.models.Model.load(info["model_uri"]).load_input_example()
        assert list(example.columns) == ["image"] and len(example) == 1
        train_run = client.get_run(info["run_id"])
        assert {d.dataset.name for d in train_run.inputs.dataset_inputs} == {"train", "val"}


def test_a_stage_runs_the_code_of_its_own_checkout(tmp_path: Path):
    """Two checkouts that differ in one module, with the environment pointing at the other one (as an editable
    install of a second clone does): the stage script imports its own."""
    import shutil

    repo = Path(__file__).resolve().parents[1]
    own, other = tmp_path / "own", tmp_path / "other"
    for checkout in (own, other):
        for folder in ("pipeline", "src"):
            shutil.copytree(repo / folder, checkout / folder, ignore=shutil.ignore_patterns("__pycache__"))
    with open(own / "pipeline" / "sources.py", "a") as f:
        f.write("\nraise SystemExit('imported the own checkout')\n")
    env = {**os.environ, "PYTHONPATH": str(other)}
    out = subprocess.run([sys.executable, str(own / "src" / "fetch.py")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert "imported the own checkout" in out.stderr, out.stderr[-2000:]
