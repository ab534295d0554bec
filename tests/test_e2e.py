"""End to end: `dvc repro` on a tiny built-in sample in a temporary copy of the repository.

Checks what a user relies on: every stage runs offline from a clean copy, the metrics file and both CSVs are
there and well formed, MLflow holds the runs and the registry alias, a second `dvc repro` does nothing, and
editing one params value reruns exactly the stages that read it.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.test_dvc import NOT_DEPENDENCIES, covers, leaves

REPO = Path(__file__).resolve().parents[1]
SKIP = {".git", ".dvc/tmp", ".dvc/cache", "data", "models", "mlruns", "metrics", "plots", "predictions", "reports",
        "optuna", ".cache", "bench", ".pytest_cache", "dvc.lock"}
TINY = {
    ("sample", "train_per_class"): 48,
    ("sample", "test_per_class"): 16,
    ("tune", "n_trials"): 2,
    ("tune", "epochs"): 2,
    ("train", "epochs"): 3,
    ("advtrain", "epochs"): 1,
    ("advtrain", "batch_size"): 32,
    ("evaluate", "epsilons"): [0, 8],
    ("evaluate", "attacks"): [{"name": "apgd", "steps": 5}, {"name": "square", "queries": 30, "images": 16},
                              {"name": "transfer"}],
}


def _copy_repo(dst: Path) -> None:
    def ignore(folder: str, names: list[str]) -> set[str]:
        rel = Path(folder).relative_to(REPO)
        return {n for n in names if (rel / n).as_posix() in SKIP or n == "__pycache__"}

    shutil.copytree(REPO, dst, ignore=ignore)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    for (section, key), value in TINY.items():
        params[section][key] = value
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "tiny"]):
        subprocess.run(cmd, cwd=dst, check=True)


def _repro(cwd: Path, env: dict) -> str:
    out = subprocess.run(["dvc", "repro"], cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, f"dvc repro failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout


def _ran(stdout: str) -> set[str]:
    return {line.split("'")[1] for line in stdout.splitlines() if line.startswith("Running stage '")}


def _api(server: str, path: str, body: dict | None = None) -> dict:
    """MLflow's REST API, as any client would call it."""
    import urllib.request

    request = urllib.request.Request(f"{server}/api/2.0/mlflow/{path}", method="POST" if body else "GET",
                                     data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def repo(tmp_path_factory, mlflow_server):
    root = tmp_path_factory.mktemp("e2e") / "repo"
    _copy_repo(root)
    # The stages run unchanged against a tracking server: only the environment says where it is.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHON": sys.executable, "MLFLOW_TRACKING_URI": mlflow_server}
    # Each stage writes which params keys it read (tests/recorder/sitecustomize.py), checked against dvc.yaml below.
    recorder = os.pathsep.join(p for p in (str(REPO / "tests" / "recorder"), os.environ.get("PYTHONPATH")) if p)
    first = _repro(root, {**env, "PYTHONPATH": recorder, "CIFAKE_RECORD_PARAMS": str(root.parent / "reads")})
    return root, env, first


def test_full_pipeline_runs_every_stage_offline(repo):
    root, _, first = repo
    assert _ran(first) == {"fetch", "preprocess", "tune", "train", "advtrain", "evaluate", "predict"}


def test_metrics_file_has_clean_adversarial_and_weighted_scores(repo):
    root, _, _ = repo
    m = json.loads((root / "metrics/evaluate.json").read_text())
    both_classes = {"balanced_accuracy", "recall_real", "recall_fake", "roc_auc", "fake_share"}
    for model in (m, m["baseline"]):
        for split in ("clean", "adversarial", "diagnostic", "worst"):
            assert set(model[split]) >= {"accuracy", "precision", "recall", "f1"} | both_classes
        for key in ("weighted_f1", "robust_score"):
            assert model["ci95"][key]["low"] <= model[key] <= model["ci95"][key]["high"]
    # every attack on its own, for both models (transfer replays the undefended model's images on the defended one)
    for model, attacks in ((m, ("apgd", "square", "transfer")), (m["baseline"], ("apgd", "square"))):
        for name in attacks:
            assert set(model[name]) >= {"balanced_accuracy", "roc_auc", "images"}
            if name != "square":  # on every diagnosed image, so the per-image worst case is at most as high
                assert model["worst"]["balanced_accuracy"] <= model[name]["balanced_accuracy"] + 1e-12
    assert "transfer" not in m["baseline"]
    assert set(m["gradient_masking"]) == {"square", "transfer"}
    assert m["gradient_masking"]["square"]["images"] == 16 and m["square"]["images"] == 16
    assert [a["name"] for a in m["protocol"]["attacks"]] == ["apgd", "square", "transfer"]
    weights = yaml.safe_load((root / "params.yaml").read_text())["evaluate"]["weights"]
    expected = weights["clean"] * m["clean"]["f1"] + weights["adversarial"] * m["adversarial"]["f1"]
    assert m["weighted_f1"] == pytest.approx(expected)
    ba = weights["clean"] * m["clean"]["balanced_accuracy"] + weights["adversarial"] * m["worst"]["balanced_accuracy"]
    assert m["robust_score"] == pytest.approx(ba)
    floor = m["reference"]["always_fake_weighted_f1"]
    assert m["weighted_f1_minus_always_fake"] == pytest.approx(m["weighted_f1"] - floor)
    # each model is judged at the threshold its stage chose on validation and stored beside it
    assert m["threshold"] == json.loads((root / "models/model_adv.json").read_text())["threshold"]
    assert m["baseline"]["threshold"] == json.loads((root / "models/model.json").read_text())["threshold"]
    assert m["at_0.5"]["threshold"] == 0.5 and set(m["at_0.5"]) >= {"robust_score", "clean_balanced_accuracy"}
    # the built-in sample's proven bounds at every epsilon of the curve and the attacks
    eps = {f"eps{e:g}" for e in TINY[("evaluate", "epsilons")]}
    bounds = m["sample_bounds"]
    assert set(bounds) >= eps and all(0 <= b["lower"] <= b["upper"] <= 1 for b in bounds.values())


def _labelled(root: Path, name: str) -> dict[str, str]:
    with open(root / "predictions" / name, newline="") as f:
        return {row[0]: row[1] for row in list(csv.reader(f))[1:]}


def test_predictions_and_figures_are_the_evaluated_models_at_its_stored_threshold(repo):
    # Recomputed from the saved model and the saved sets: the CSVs hold its labels at the threshold stored beside
    # it (not at 0.5), and evaluate's figures and Brier scores are those of the same answers.
    from PIL import Image

    from pipeline import config, data, inference, metrics, model, predicting

    root, _, _ = repo
    params = config.load(root / "params.yaml")
    threshold = json.loads((root / "models/model_adv.json").read_text())["threshold"]
    m = json.loads((root / "metrics/evaluate.json").read_text())
    adv = model.load(root / "models/model_adv.keras")
    test = data.load_split(root / "data/processed", "test")
    with zipfile.ZipFile(root / "data/Test_dataset_2.zip") as zf:
        attacked = np.stack([np.asarray(Image.open(zf.open(Path(n).with_suffix(".png").as_posix())))
                             for n in test.names])
    for name, x, split, suffix in (("Test_1_results.csv", test.x, "clean", ".jpg"),
                                   ("Test_2_results.csv", attacked, "adversarial", ".png")):
        p = inference.probabilities(adv, x, params.inference)
        rows = _labelled(root, name)
        assert [rows[Path(n).with_suffix(suffix).as_posix()] for n in test.names] == predicting.labels(p, threshold)
        assert m[split]["balanced_accuracy"] == pytest.approx(metrics.measure(test.y, p, threshold=threshold))
        assert m[f"brier_{split}"] == pytest.approx(metrics.brier(test.y, p), abs=1e-6)


def test_the_deliverables_beside_the_metrics(repo):
    from PIL import Image

    from pipeline import model

    root, _, _ = repo
    with Image.open(root / "plots/explanations.png") as grid:  # 4 + 4 test images, clean and attacked
        assert grid.width > 400 and grid.height > 400
    for split in ("clean", "adversarial"):
        assert (root / f"plots/calibration_{split}.csv").read_text().startswith("set,bin,mean_predicted")
    h5, keras_file = root / "models/ResNet50_CIFAKE_best.h5", root / "models/model_adv.keras"
    x = (np.arange(2 * 32 * 32 * 3) % 251).astype(np.uint8).reshape(2, 32, 32, 3)
    assert np.array_equal(model.predict_proba(model.load(h5), x), model.predict_proba(model.load(keras_file), x))


def test_dvc_plots_show_makes_one_page_that_needs_no_network(repo, tmp_path):
    import re

    root, env, _ = repo
    out = subprocess.run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    page = (tmp_path / "plots/index.html").read_text()
    assert "vegaEmbed" in page and "Reliability" in page and "explanations.png" in page
    # nothing is loaded from elsewhere: no script, stylesheet or image with a URL
    assert not re.findall(r"""<(?:script|link|img)[^>]+(?:src|href)\s*=\s*["']?(?:https?:)?//""", page, re.I)


def test_both_csvs_list_every_test_image_as_real_or_fake(repo):
    root, _, _ = repo
    n = 2 * TINY[("sample", "test_per_class")]
    for name, suffix in (("Test_1_results.csv", ".jpg"), ("Test_2_results.csv", ".png")):
        with open(root / "predictions" / name, newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["Image Name", "Predicted Label"]
        assert len(rows) == n + 1
        assert {r[1] for r in rows[1:]} <= {"Real", "Fake"}
        assert all(r[0].split("/")[0] in ("REAL", "FAKE") and r[0].endswith(suffix) for r in rows[1:])
    with zipfile.ZipFile(root / "data/Test_dataset_2.zip") as zf:
        assert len([name for name in zf.namelist() if name.endswith(".png")]) == n


def test_the_tracking_server_holds_runs_trials_versions_and_the_champion_rule(repo, mlflow_server):
    root, _, _ = repo
    experiment = _api(mlflow_server, "experiments/get-by-name?experiment_name=cifake")["experiment"]
    runs = _api(mlflow_server, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 500})
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs["runs"]]
    assert sorted({t.get("stage") for t in tags}) == ["advtrain", "evaluate", "train", "tune"]
    assert sum("mlflow.parentRunId" in t for t in tags) == TINY[("tune", "n_trials")]
    assert all(r["info"]["status"] == "FINISHED" for r in runs["runs"])
    model = _api(mlflow_server, "registered-models/get?name=cifake-resnet50")["registered_model"]
    versions = _api(mlflow_server, "model-versions/search?filter=name%3D%27cifake-resnet50%27")["model_versions"]
    assert len(versions) == 2  # train and advtrain each register one
    evaluated = json.loads((root / "models/model_adv.json").read_text())["version"]
    version = _api(mlflow_server, f"model-versions/get?name=cifake-resnet50&version={evaluated}")["model_version"]
    info = {"tags": {t["key"]: t["value"] for t in version.get("tags", [])}, "evaluated": evaluated,
            "champion": next((a["version"] for a in model.get("aliases", []) if a["alias"] == "champion"), None)}
    m = json.loads((root / "metrics/evaluate.json").read_text())
    assert float(info["tags"]["robust_score"]) == pytest.approx(m["robust_score"], abs=1e-6)
    assert info["tags"]["protocol"] == m["protocol"]["id"]
    # The tiny model may or may not beat always-FAKE; the alias must follow the rule either way.
    beats_reference = (m["robust_score"] > m["reference"]["always_fake_robust_score"]
                       and m["weighted_f1"] > m["reference"]["always_fake_weighted_f1"])
    assert (info["champion"] is not None and str(info["champion"]) == info["evaluated"]) == beats_reference


def test_second_repro_does_nothing(repo):
    root, env, _ = repo
    assert _ran(_repro(root, env)) == set()


def test_stages_read_no_params_key_that_dvc_yaml_does_not_declare(repo):
    root, _, _ = repo
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    for stage, spec in stages.items():
        read = json.loads((root.parent / "reads" / f"{stage}.json").read_text())
        undeclared = [k for k in read if not k.startswith(NOT_DEPENDENCIES)
                      and not any(covers(d, k) for d in spec.get("params", []))]
        assert not undeclared, f"{stage} reads {undeclared} but dvc.yaml does not list them"


# Which stages `dvc status` must name after an edit of each params key (the most specific entry wins). This is the
# table users read in the README; every key of params.yaml must match an entry.
KEY_STAGES = {
    "base.seed": {"fetch", "preprocess", "tune", "train", "advtrain", "evaluate", "predict"},
    "data": {"fetch"},
    "data.source": {"fetch", "evaluate"},  # evaluate reports the built-in sample's proven bounds
    "sample": {"fetch"},
    "preprocess": {"preprocess"},
    # how images are decoded: also baked into the served model's settings by train and advtrain
    "preprocess.resize": {"preprocess", "train", "advtrain", "predict"},
    "preprocess.max_pixels": {"preprocess", "train", "advtrain", "predict"},
    "model": {"tune", "train"},
    "tune": {"tune"},
    "tune.storage": set(),
    "tune.heartbeat": set(),
    "train": {"train"},
    "advtrain": {"advtrain"},
    "evaluate": {"evaluate"},
    "evaluate.diagnostic": {"advtrain", "evaluate"},  # advtrain chooses its threshold under it
    "evaluate.weights": {"tune", "train", "advtrain", "evaluate"},  # the selection rule: trials, epochs, thresholds
    "evaluate.measure": {"tune", "train", "advtrain", "evaluate"},
    "threshold.rule": {"train", "advtrain", "evaluate"},
    "threshold.fixed": {"train", "advtrain", "evaluate", "predict"},  # predict: for a model that stored none
    "predict.batch_size": {"predict"},
    "inference": {"tune", "train", "evaluate", "predict"},  # features (tune, train) and every forward pass
    "inference.check_images": {"evaluate", "predict"},  # the bf16 check of labelled passes only
    "inference.agreement": {"evaluate", "predict"},
    "mlflow": set(),
}


def _status(root: Path) -> set[str]:
    from dvc.repo import Repo

    with Repo(str(root)) as dvc:  # in process: ~0.2 s a call, against ~1 s for the command line
        return {key.rsplit(":", 1)[-1] for key in dvc.status()}  # "<path>/dvc.yaml:stage" from another cwd


def test_editing_each_params_key_reruns_exactly_the_stages_that_read_it(repo):
    root, _, _ = repo
    params_file = root / "params.yaml"
    original = params_file.read_text()
    assert _status(root) == set()
    try:
        for key in leaves(yaml.safe_load(original)):
            if key.startswith("paths."):
                continue  # paths are the stage definitions themselves
            expected = KEY_STAGES[max((k for k in KEY_STAGES if covers(k, key)), key=len)]
            tree = yaml.safe_load(original)
            *parents, leaf = key.split(".")
            node = tree
            for part in parents:
                node = node[part]
            node[leaf] = f"changed-{node[leaf]}"  # DVC compares values; nothing runs, so any value will do
            params_file.write_text(yaml.safe_dump(tree, sort_keys=False))
            assert _status(root) == expected, key
    finally:
        params_file.write_text(original)
    assert _status(root) == set()


def test_editing_each_module_reruns_exactly_the_stages_that_import_it(repo):
    root, _, _ = repo
    from pipeline import provenance

    closures = {s: {p.as_posix() for p in provenance.closure(REPO / "src" / f"{s}.py")} for s in _stages(root)}
    for module in sorted((root / "pipeline").glob("*.py")):
        rel = module.relative_to(root).as_posix()
        original = module.read_text()
        try:
            module.write_text(original + "\n# edited\n")
            assert _status(root) == {s for s, mods in closures.items() if rel in mods}, rel
        finally:
            module.write_text(original)
    assert _status(root) == set()


def _stages(root: Path) -> list[str]:
    return list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])


def test_a_fresh_clone_plus_dvc_pull_is_up_to_date(repo):
    root, env, _ = repo
    remote, clone = root.parent / "dvc-remote", root.parent / "clone"

    def run(*cmd: str, cwd: Path = root) -> str:
        out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{cmd}: {out.stdout[-2000:]}{out.stderr[-2000:]}"
        return out.stdout

    run("dvc", "remote", "add", "-d", "store", str(remote))  # a folder here; S3, GCS, SSH... for a team
    run("git", "add", "-A")
    run("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "results")
    run("dvc", "push")
    run("git", "clone", "-q", str(root), str(clone), cwd=root.parent)
    run("dvc", "pull", cwd=clone)
    assert "up to date" in run("dvc", "status", cwd=clone)
    assert _ran(_repro(clone, env)) == set()  # nothing recomputed: what a colleague ran is reused
    assert (clone / "models/model_adv.keras").read_bytes() == (root / "models/model_adv.keras").read_bytes()


def test_editing_evaluate_epsilon_reruns_only_evaluate_and_predict(repo, mlflow_server):
    root, env, _ = repo
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"]["attack"]["epsilon"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_repro(root, env)) == {"evaluate", "predict"}
    # what `mlflow ui`'s compare view shows of the two evaluate runs: the attack's size, and what it costs (the
    # tiny model is broken at both 4/255 and 8/255, so the smaller attack is 1/255; AUC counts both classes)
    experiment = _api(mlflow_server, "experiments/get-by-name?experiment_name=cifake")["experiment"]["experiment_id"]
    runs = _api(mlflow_server, "runs/search", {"experiment_ids": [experiment], "filter": "tags.stage = 'evaluate'",
                                               "order_by": ["attributes.start_time DESC"], "max_results": 2})["runs"]
    data = [({p["key"]: p["value"] for p in r["data"]["params"]}, {m["key"]: m["value"] for m in r["data"]["metrics"]})
            for r in runs]
    assert [float(d[0]["evaluate.attack.epsilon"]) for d in data] == [1.0, 8.0]
    assert data[0][1]["adversarial.roc_auc"] > data[1][1]["adversarial.roc_auc"] + 0.05, data
    # what each run's attacks cost, as bench/fullscale.py's floor reads it: the first run paid for every attack, the
    # rerun for none (FGSM's signs and every other pass came back from the cache)
    from bench.fullscale import evaluate_work

    first, n = data[1][1], 2 * TINY[("sample", "test_per_class")]
    assert first["gradients.baseline.signs"] == first["gradients.advtrained.signs"] == n
    assert first["gradients.advtrained.diagnostic"] > 0 and first["queries.advtrained.square"] > 0
    assert not any(k.startswith(("gradients.", "queries.")) for k in data[0][1])
    assert evaluate_work(mlflow_server, "cifake") == {"gradients": 0, "queries": 0}


def test_editing_train_epochs_reruns_train_onward_but_not_tune(repo):
    root, env, _ = repo
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["epochs"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran = _ran(_repro(root, env))
    assert {"train", "advtrain", "evaluate"} <= ran
    assert not ran & {"fetch", "preprocess", "tune"}
