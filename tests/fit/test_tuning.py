"""pipeline.fit.tuning: the Optuna objective, nested MLflow runs, study naming, resuming and the best trial."""
from __future__ import annotations

import mlflow
import numpy as np
import optuna
import pytest

from pipeline import config, tracking
from pipeline.fit import studies, tuning
from pipeline.fit.training import Arrays
from pipeline.judge import metrics
from pipeline.model.network import backbone_of

FIXED = {"dropout": 0.3, "learning_rate": 1e-3}


def with_tune(params: config.Params, **changes) -> config.Params:
    return params.model_copy(update={"tune": params.tune.model_copy(update=changes)})


def random_features(n_train: int = 48, n_val: int = 16, seed: int = 0) -> Arrays:
    rng = np.random.default_rng(seed)
    y_train, y_val = np.tile([0, 1], n_train // 2).astype(np.uint8), np.tile([0, 1], n_val // 2).astype(np.uint8)
    # A little signal in the first feature, so trials differ and F1 is not degenerate.
    x_train = rng.normal(size=(n_train, 2048)).astype(np.float32) + 2 * y_train[:, None] * (np.arange(2048) < 8)
    x_val = rng.normal(size=(n_val, 2048)).astype(np.float32) + 2 * y_val[:, None] * (np.arange(2048) < 8)
    return Arrays(x_train, y_train, x_val.astype(np.float32), y_val)


@pytest.fixture
def tune_params(params: config.Params) -> config.Params:
    """Tiny and quick: 2 epochs, small batches, clean objective, storage in tmp_path (from ``params``)."""
    return with_tune(params, epochs=2, batch_size=16, n_trials=2, objective="clean")


def child_runs(experiment: str):
    exp = mlflow.get_experiment_by_name(experiment)
    return mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="list")


def test_objective_clean_on_a_fixed_trial(tune_params, mlflow_store) -> None:
    tune_params = with_tune(tune_params, patience=None)  # the head kept is the last epoch's
    tracking.setup(tune_params.mlflow)
    trial = optuna.trial.FixedTrial(FIXED)
    with mlflow.start_run(run_name="parent") as parent:
        value = tuning.Objective(tune_params, random_features())(trial)
    assert 0.5 < value < 1.0
    assert trial.user_attrs["clean"] == value == trial.user_attrs[tune_params.evaluate.measure]
    runs = [r for r in child_runs(mlflow_store.experiment) if r.info.run_id != parent.info.run_id]
    assert len(runs) == 1
    child = runs[0].data
    assert child.tags["mlflow.parentRunId"] == parent.info.run_id and child.tags["optuna.state"] == "COMPLETE"
    assert float(child.params["dropout"]) == 0.3 and float(child.params["learning_rate"]) == 1e-3
    assert child.metrics["clean"] == pytest.approx(value)
    # the kept head scored as the epoch's validation scored it: in inference mode (dropout off, batch norm's averages)
    assert value == pytest.approx(child.metrics[f"val_{tune_params.evaluate.measure}"], abs=1e-9)
    assert {"val_f1", "val_balanced_accuracy", "loss"} <= set(child.metrics)  # per-epoch curves (MlflowEpochLogger)


def test_objective_robust_attacks_the_validation_images(tune_params, mlflow_store, graded_model) -> None:
    # The graded model's images: the trial's head learns their line cue, which the FGSM of tune.attack flips.
    params = with_tune(tune_params, objective="robust", epochs=8, batch_size=32)
    tracking.setup(params.mlflow)
    g = graded_model
    feats, backbone = Arrays(g.features, g.y, g.features, g.y), backbone_of(g.model)
    robust, clean = optuna.trial.FixedTrial(FIXED), optuna.trial.FixedTrial(FIXED)
    with mlflow.start_run(run_name="parent"):
        values = {"robust": tuning.Objective(params, feats, backbone, g.x)(robust),
                  "clean": tuning.Objective(with_tune(params, objective="clean"), feats, backbone, g.x)(clean)}
    attrs, m = robust.user_attrs, params.evaluate.measure
    assert set(attrs) >= {"f1", "adv_f1", m, f"adv_{m}", "robust"}
    assert values["robust"] == attrs["robust"]
    w = params.evaluate.weights
    assert values["robust"] == pytest.approx(w.clean * attrs[m] + w.adversarial * attrs[f"adv_{m}"])
    # scored with the trial's own head (the clean objective's figure for the same trial), then attacked
    assert attrs[m] == pytest.approx(values["clean"], abs=0.02) and attrs[m] >= 0.8
    assert attrs[f"adv_{m}"] < attrs[m] - 0.1


def test_study_logs_one_parent_and_a_nested_run_per_trial(tune_params, mlflow_store) -> None:
    study = studies.make_study(tune_params, "data0")
    with tracking.stage_run("tune", tune_params, run_name="tune") as parent:
        assert tuning.optimize(study, tuning.Objective(tune_params, random_features()), 2) == 2
    runs = child_runs(mlflow_store.experiment)
    assert len(runs) == 3
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert [r.info.run_id for r in parents] == [parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["trial-0", "trial-1"]
    assert all(r.data.tags["stage"] == "tune" and "f1" in r.data.metrics for r in children)


def test_study_name_follows_the_search_space_not_the_trial_count(tune_params) -> None:
    name = studies.study_name(tune_params, "data0")
    assert name.startswith("cifake-head-")
    assert studies.study_name(with_tune(tune_params, n_trials=50), "data0") == name
    assert studies.study_name(with_tune(tune_params, storage="sqlite:///elsewhere.db"), "data0") == name
    wider = tune_params.tune.dropout.model_copy(update={"high": 0.45})
    assert studies.study_name(with_tune(tune_params, dropout=wider), "data0") != name
    assert studies.study_name(with_tune(tune_params, epochs=3), "data0") != name
    assert studies.study_name(tune_params, "other-data") != name
    # the trials read cached features: another precision for them is another study, not a complete old one
    bf16 = tune_params.model_copy(update={"inference": tune_params.inference.model_copy(update={"precision": "bf16"})})
    assert studies.study_name(bf16, "data0") != name
    less = tune_params.model_copy(update={"inference": tune_params.inference.model_copy(update={"check_images": 10})})
    assert studies.study_name(less, "data0") == name  # the bf16 check of evaluate and predict: not the features'


def test_optimize_resumes_and_best_returns_the_best_trial(tune_params, mlflow_store, tmp_path) -> None:
    tracking.setup(tune_params.mlflow)
    objective = tuning.Objective(tune_params, random_features())
    assert tune_params.tune.storage == f"sqlite:///{tmp_path}/optuna/study.db"
    with mlflow.start_run(run_name="first"):
        assert tuning.optimize(studies.make_study(tune_params, "data0"), objective, 2) == 2
    # A new process would reopen the study from storage: the finished trials count, none are run again.
    study = studies.make_study(tune_params, "data0")
    with mlflow.start_run(run_name="again"):
        assert tuning.optimize(study, objective, 2) == 0
        assert tuning.optimize(study, objective, 3) == 1
    trials = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert len(trials) == 3
    top = max(trials, key=lambda t: t.value)
    best = tuning.best(study)
    assert best["dropout"] == top.params["dropout"] and best["learning_rate"] == top.params["learning_rate"]
    assert best["value"] == top.value and best["trial"] == top.number and best["clean"] == top.value
    assert best["study"] == studies.study_name(tune_params, "data0")
    lo, hi = tune_params.tune.dropout.low, tune_params.tune.dropout.high
    assert lo <= best["dropout"] <= hi


def test_the_best_trial_by_its_objective_is_handed_over_when_trials_differ(tune_params, mlflow_store) -> None:
    # Learning rates 1e-5..1e-1 over 2 epochs on features with a clear signal: the trials really differ, and the
    # best is not the first one (checked below), so handing over any trial but the best fails.
    tracking.setup(tune_params.mlflow)
    params = with_tune(tune_params, n_trials=6, learning_rate=tune_params.tune.learning_rate.model_copy(
        update={"low": 1e-5, "high": 1e-1}), pruner="none", patience=None)
    study = studies.make_study(params, "data0")
    with mlflow.start_run(run_name="study"):
        tuning.optimize(study, tuning.Objective(params, random_features(n_train=96, n_val=64)), 6)
    trials = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    values = [t.value for t in trials]
    assert max(values) - min(values) >= 0.1, values
    top = max(trials, key=lambda t: t.value)
    assert top.number != 0
    best = tuning.best(study)
    assert (best["trial"], best["value"], best["learning_rate"]) == (top.number, top.value, top.params["learning_rate"])
    assert best["completed"] == {"n": 6, "best": top.value, "median": float(np.median(values)),
                                 "worst": min(values)}


def test_best_hands_over_the_best_completed_trial_and_the_spread(params: config.Params) -> None:
    space = {"dropout": optuna.distributions.FloatDistribution(0.0, 0.9),
             "learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True)}
    study = optuna.create_study(direction="maximize", study_name="s")
    for value, dropout in ((0.6, 0.1), (0.8, 0.2), (0.7, 0.3)):
        study.add_trial(optuna.trial.create_trial(params={"dropout": dropout, "learning_rate": 1e-3},
                                                  distributions=space, value=value, user_attrs={"f1": value / 2}))
    study.add_trial(optuna.trial.create_trial(params={"dropout": 0.5, "learning_rate": 1e-2}, distributions=space,
                                              state=optuna.trial.TrialState.PRUNED))
    assert tuning.best(study) == {"dropout": 0.2, "learning_rate": 1e-3, "value": 0.8, "trial": 1, "study": "s",
                                  "f1": 0.4, "completed": {"n": 3, "best": 0.8, "median": 0.7, "worst": 0.6}}


def test_objective_scores_name_the_clean_and_the_robust_value(params: config.Params) -> None:
    p = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"measure": "macro_f1"})})
    y = np.array([1, 1, 0, 0])
    objective = tuning.Objective(p, Arrays(np.zeros((4, 2)), y, np.zeros((4, 2)), y))
    p_clean, p_adv = np.array([0.9, 0.6, 0.4, 0.7]), np.array([0.4, 0.6, 0.2, 0.7])
    clean = objective._scores(p_clean)
    assert clean["clean"] == metrics.measure(y, p_clean, "macro_f1") and "robust" not in clean
    both = objective._scores(p_clean, p_adv)
    assert both["robust"] == metrics.robust_score(y, p_clean, p_adv, p.evaluate.weights, "macro_f1")
    assert both["clean"] == clean["clean"] != both["robust"]
