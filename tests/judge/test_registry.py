"""pipeline.judge.registry: the champion moves by robust_score under one protocol, never below the always-FAKE
reference, re-scores a champion measured under another protocol, and treats registry errors as errors."""
from __future__ import annotations

import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline import config, tracking
from pipeline.errors import TrackingError
from pipeline.judge import evaluation, registry
from pipeline.model import inference

NAME = "cifake-test"
ROOT_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
REFERENCE = {"always_fake_robust_score": 0.5, "always_fake_weighted_f1": 2 / 3}


def register_version() -> str:
    """A cheap registered version: a run with one small artifact."""
    with mlflow.start_run() as run:
        mlflow.log_text("not a real model", "model/MLmodel.txt")
    client = MlflowClient()
    if not client.search_registered_models(filter_string=f"name = '{NAME}'"):
        client.create_registered_model(NAME)
    return str(client.create_model_version(NAME, f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version)


def no_rescore(version: str) -> registry.Standing:
    raise AssertionError(f"v{version} should not need re-scoring")


@pytest.fixture
def store(params, mlflow_store):
    tracking.setup(params.mlflow)
    return params


def test_champion_moves_only_to_a_better_robust_score_under_the_same_protocol(store) -> None:
    v1, v2, v3 = register_version(), register_version(), register_version()
    assert registry.update_champion(NAME, registry.Standing(v1, 0.80, 0.85, "P"), REFERENCE, no_rescore)[0]
    assert registry.champion(NAME) == v1
    assert registry.update_champion(NAME, registry.Standing(v2, 0.90, 0.80, "P"), REFERENCE, no_rescore)[0]
    assert registry.champion(NAME) == v2  # robust_score decides, not weighted_f1
    held, why = registry.update_champion(NAME, registry.Standing(v3, 0.90, 0.99, "P"), REFERENCE, no_rescore)
    assert not held and registry.champion(NAME) == v2 and "<=" in why  # a tie keeps the champion
    assert registry.standing(NAME, v3) == registry.Standing(v3, 0.90, 0.99, "P")  # scores are stored either way


def test_a_changed_protocol_rescores_the_champion_before_comparing(store) -> None:
    v1, v2 = register_version(), register_version()
    registry.update_champion(NAME, registry.Standing(v1, 0.60, 0.80, "eps4"), REFERENCE, no_rescore)
    rescored = []

    def rescore(version: str) -> registry.Standing:  # under eps 8, v1 does better than v2 does
        rescored.append(version)
        return registry.Standing(version, 0.75, 0.85, "eps8")

    # v2's 0.70 beats v1's stored 0.60, but that was measured at another epsilon: v1 scores 0.75 under eps 8.
    held, _ = registry.update_champion(NAME, registry.Standing(v2, 0.70, 0.80, "eps8"), REFERENCE, rescore)
    assert rescored == [v1] and not held and registry.champion(NAME) == v1
    assert registry.standing(NAME, v1).protocol == "eps8"


def test_never_promotes_at_or_below_the_always_fake_reference(store) -> None:
    v1, v2 = register_version(), register_version()
    held, why = registry.update_champion(NAME, registry.Standing(v1, 0.50, 0.90, "P"), REFERENCE, no_rescore)
    assert not held and registry.champion(NAME) is None and "always-FAKE" in why
    # robust enough by robust_score, but the mission's weighted F1 does not beat calling everything FAKE
    held, _ = registry.update_champion(NAME, registry.Standing(v2, 0.70, 0.66, "P"), REFERENCE, no_rescore)
    assert not held and registry.champion(NAME) is None


def test_should_promote_refuses_to_compare_across_protocols() -> None:
    with pytest.raises(ValueError, match="re-score"):
        registry.should_promote(registry.Standing("2", 0.9, 0.9, "A"), registry.Standing("1", 0.8, 0.8, "B"),
                                REFERENCE)


def test_a_registry_error_is_an_error_not_no_champion(store, monkeypatch) -> None:
    assert registry.champion("never-registered") is None  # a missing model is "no champion"

    def broken(self, name):
        raise MlflowException("database is locked", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(MlflowClient, "get_registered_model", broken)
    with pytest.raises(TrackingError, match="champion was not changed"):
        registry.champion(NAME)
    with pytest.raises(TrackingError):
        registry.update_champion(NAME, registry.Standing("1", 0.9, 0.9, "P"), REFERENCE, no_rescore)


def test_protocol_covers_attack_settings_test_set_threshold_and_inference() -> None:
    cfg = config.Evaluate(attack={"name": "fgsm", "epsilon": 8}, diagnostic={"name": "pgd", "epsilon": 8},
                          epsilons=[0, 8], weights={"clean": 0.4, "adversarial": 0.6}, measure="balanced_accuracy",
                          batch_size=8)
    x, y = np.zeros((4, 32, 32, 3), np.uint8), np.array([0, 0, 1, 1])

    def pid(c=cfg, xx=x, threshold_rule=0.5, inference_cfg=inference.AUTO):
        return evaluation.protocol_id(evaluation.protocol(c, xx, y, 0, threshold_rule, inference_cfg))

    assert pid() == pid()
    other_eps = cfg.model_copy(update={"attack": cfg.attack.model_copy(update={"epsilon": 4})})
    other_steps = cfg.model_copy(update={"diagnostic": cfg.diagnostic.model_copy(update={"steps": 20})})
    changed = x.copy()
    changed[0, 0, 0, 0] = 1
    # bf16 moves attacked labels: not the same measurement
    ids = {pid(), pid(other_eps), pid(other_steps), pid(xx=changed), pid(threshold_rule=0.6),
           pid(inference_cfg=config.Inference(precision="bf16"))}
    assert len(ids) == 6


def test_rescore_evaluates_a_registered_version_under_the_current_protocol(store, small_graded_model,
                                                                           small_graded_model_file) -> None:
    from pipeline.model import serving
    from tests.conftest import cue_images, threshold_that_matters

    # every kind of attack, at budgets that keep it seconds (the defaults' Square alone took minutes here)
    cfg = config.load(ROOT_PARAMS, ["evaluate.diagnostic.steps=2", "evaluate.epsilons=[0, 8]",
                                    "evaluate.attacks=[{name: apgd, steps: 2}, {name: square, queries: 5}]"]).evaluate
    x, y = cue_images(16, seed=4)
    rule = {"rule": "criterion", "fixed": 0.5}
    # The version is judged at its own stored threshold, one whose labels differ from 0.5's, and attacked.
    stored = threshold_that_matters(evaluation.run_protocol(small_graded_model.model, x, y, cfg, 0).p_clean)
    with mlflow.start_run():
        settings = {"threshold": stored, "resize": "resize", "max_pixels": 10**6}
        info = serving.log_version(small_graded_model_file, settings, "model", NAME)
    pid = evaluation.protocol_id(evaluation.protocol(cfg, x, y, 0, rule))
    got = evaluation.rescore(NAME, info["version"], x, y, cfg, 0, pid)
    direct = evaluation.run_protocol(small_graded_model.model, x, y, cfg, 0, stored)
    at_half = evaluation.run_protocol(small_graded_model.model, x, y, cfg, 0, 0.5)
    assert got.version == info["version"]
    assert got.protocol == pid
    assert got.robust_score == pytest.approx(direct.robust_score)
    assert got.weighted_f1 == pytest.approx(direct.weighted_f1)
    assert (got.robust_score, got.weighted_f1) != pytest.approx((at_half.robust_score, at_half.weighted_f1))
    # the score counts the attack: the model the attacks break scores below its clean balanced accuracy
    assert got.robust_score < direct.clean["balanced_accuracy"] - 0.1


def test_a_contender_holding_the_lock_longer_than_the_staleness_bound_keeps_it(store) -> None:
    # A champion's re-score is a whole evaluation: a live holder's ticket must not be judged dead by its age alone.
    import threading

    with mlflow.start_run() as run:
        pass
    events: list[tuple[str, str]] = []

    def contender(who: str, hold_s: float) -> None:
        try:
            with registry.champion_lock(NAME, run.info.run_id, stale_after_s=4.0, poll_s=0.1):
                events.append((who, "enter"))
                time.sleep(hold_s)
                events.append((who, "leave"))
        except Exception as err:  # noqa: BLE001  (a thread's exception would be lost; the assertion shows it)
            events.append((who, repr(err)))

    first = threading.Thread(target=contender, args=("A", 9.0))  # beats every second against a 4 s bound
    first.start()
    time.sleep(1.0)
    second = threading.Thread(target=contender, args=("B", 0.1))
    second.start()
    first.join()
    second.join()
    assert events == [("A", "enter"), ("A", "leave"), ("B", "enter"), ("B", "leave")]


CONTENDER = """
import sys, time, mlflow
from pipeline.judge import registry
uri, name, version, score = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
mlflow.set_tracking_uri(uri)
def rescore(v):  # slow on purpose: without the lock, both contenders would judge against the same stale champion
    time.sleep(2.0)
    return registry.Standing(v, 0.55, 0.7, "new")
reference = {"always_fake_robust_score": 0.5, "always_fake_weighted_f1": 2 / 3}
held, why = registry.update_champion(name, registry.Standing(version, score, 0.9, "new"), reference, rescore)
print("held" if held else "not", why, flush=True)
"""


@pytest.fixture(params=["sqlite", "server"])
def shared_registry(request, store, mlflow_store, monkeypatch) -> str:
    """The registry two workspaces share: a SQLite store, or a real tracking server (which, unlike a local store,
    validates every model version's source)."""
    if request.param == "sqlite":
        return mlflow_store.uri
    uri = request.getfixturevalue("mlflow_server")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("registry-tests")
    return uri


def test_two_evaluations_at_once_cannot_both_take_the_champion(shared_registry) -> None:
    import os
    import subprocess
    import sys
    import time

    v1, better, worse = register_version(), register_version(), register_version()
    registry.update_champion(NAME, registry.Standing(v1, 0.60, 0.80, "old"), REFERENCE, no_rescore)
    env = {**os.environ, "PYTHONPATH": str(ROOT_PARAMS.parent)}

    def contender(version: str, score: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", CONTENDER, shared_registry, NAME, version, str(score)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # The better one takes its ticket first; the worse one starts while the first is still deciding (its re-score
    # of v1 takes 2 s). Unserialised, both would judge against v1 and the worse, writing last, would win.
    first = contender(better, 0.90)
    deadline = time.monotonic() + 60
    while not MlflowClient().search_model_versions(f"name='{NAME}.champion-lock'") and time.monotonic() < deadline:
        time.sleep(0.05)
    second = contender(worse, 0.80)
    outs = [p.communicate(timeout=120) for p in (first, second)]
    assert all(p.returncode == 0 for p in (first, second)), [err[-2000:] for _, err in outs]
    assert outs[0][0].startswith("held") and outs[1][0].startswith("not"), outs
    assert registry.champion(NAME) == better
    assert not MlflowClient().search_model_versions(f"name='{NAME}.champion-lock'")  # every ticket returned


def test_the_champion_rule_lower_equal_higher_and_another_protocol() -> None:
    # robust_score alone decides under one protocol: the candidate's weighted_f1 is higher in every case below, so a
    # rule that read it, or that promoted on any change of score, would move the champion on the lower one.
    champ = registry.Standing("1", 0.80, 0.70, "P")
    for score, promoted in ((0.79, False), (0.80, False), (0.81, True)):
        held, why = registry.should_promote(registry.Standing("2", score, 0.95, "P"), champ, REFERENCE)
        assert held is promoted, (score, why)
    with pytest.raises(ValueError, match="re-score"):  # a lower score under another protocol is not compared either
        registry.should_promote(registry.Standing("2", 0.60, 0.95, "Q"), champ, REFERENCE)


def test_a_strictly_lower_candidate_leaves_the_champion_in_place(store) -> None:
    v1, v2 = register_version(), register_version()
    assert registry.update_champion(NAME, registry.Standing(v1, 0.80, 0.70, "P"), REFERENCE, no_rescore)[0]
    held, why = registry.update_champion(NAME, registry.Standing(v2, 0.79, 0.95, "P"), REFERENCE, no_rescore)
    assert not held and registry.champion(NAME) == v1 and "<=" in why, why
    assert registry.standing(NAME, v2) == registry.Standing(v2, 0.79, 0.95, "P")


def test_should_promote_needs_both_scores_strictly_above_always_fakes_and_a_finite_robust_score() -> None:
    def decide(robust: float, weighted: float, current=None) -> bool:
        return registry.should_promote(registry.Standing("2", robust, weighted, "P"), current, REFERENCE)[0]

    assert decide(0.51, 0.67)  # both floors beaten, no champion yet
    assert not decide(0.5, 0.9) and not decide(float("nan"), 0.9) and not decide(float("inf"), 0.9)
    assert not decide(0.9, 2 / 3)  # at always-FAKE's weighted F1
    champ = registry.Standing("1", 0.7, 0.9, "P")
    assert decide(0.71, 0.9, champ) and not decide(0.7, 0.9, champ)
    why = registry.should_promote(registry.Standing("2", 0.5, 0.9, "P"), None, REFERENCE)[1]
    assert why == "robust_score 0.5000 is not above always-FAKE's 0.5000"
    assert registry.should_promote(registry.Standing("2", 0.6, 0.9, "P"), None, REFERENCE) == (True, "no champion yet")
    assert registry.Standing("3", 0.61234567, 2 / 3, "P").tags() == {
        "robust_score": "0.612346", "weighted_f1": "0.666667", "protocol": "P"}
