"""pipeline.judge.metrics and the confusion rows: checked against numbers worked out by hand. FAKE (1) is positive."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pipeline import config
from pipeline.judge import metrics, reporting

# 10 images. Truth: 4 FAKE, 6 REAL. At threshold 0.5 the model says FAKE for images 0, 1, 2 (FAKE) and 4, 5 (REAL).
Y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
P = np.array([0.9, 0.8, 0.5, 0.4, 0.7, 0.6, 0.3, 0.2, 0.1, 0.0])
TP, FN, FP, TN = 3, 1, 2, 4  # image 2 sits exactly on the threshold: "at or above" counts as FAKE


def test_classification_matches_a_hand_computation() -> None:
    precision = TP / (TP + FP)  # 3/5
    recall = TP / (TP + FN)  # 3/4
    f1 = 2 * precision * recall / (precision + recall)  # 2/3
    accuracy = (TP + TN) / len(Y)  # 7/10
    # ROC AUC = share of the 4 x 6 (FAKE, REAL) pairs the scores order correctly; the wrong ones are
    # 0.5 < 0.7, 0.5 < 0.6, 0.4 < 0.7 and 0.4 < 0.6.
    auc = (24 - 4) / 24
    recall_real = TN / (TN + FP)  # 4/6
    f1_real = 2 * TN / (2 * TN + FN + FP)  # 8/11
    got = metrics.classification(Y, P, threshold=0.5)
    assert got == pytest.approx({
        "accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1, "roc_auc": auc,
        "recall_fake": recall, "recall_real": recall_real, "balanced_accuracy": (recall + recall_real) / 2,
        "macro_f1": (f1 + f1_real) / 2, "fake_share": (TP + FP) / len(Y)})
    assert got["f1"] == pytest.approx(2 / 3)
    assert metrics.f1(Y, P) == pytest.approx(f1)


def test_fake_is_the_positive_class() -> None:
    # Swapping the labels (REAL as positive) would give precision 4/5 and recall 4/6 here instead.
    swapped_precision = TN / (TN + FN)
    got = metrics.classification(Y, P)
    assert got["precision"] == pytest.approx(3 / 5) and got["precision"] != pytest.approx(swapped_precision)
    # all-FAKE predictions: recall 1 for FAKE
    assert metrics.classification(Y, np.ones(10))["recall"] == 1.0


def test_threshold_moves_the_decision() -> None:
    got = metrics.classification(Y, P, threshold=0.75)  # FAKE only for 0.9 and 0.8: TP 2, FP 0, FN 2
    assert got["precision"] == 1.0 and got["recall"] == 0.5 and got["f1"] == pytest.approx(2 / 3)


def test_zero_division_gives_zero_not_nan() -> None:
    # Nothing predicted FAKE: precision 0/0 and F1 are 0.
    got = metrics.classification(Y, np.zeros(10))
    assert got["precision"] == 0.0 and got["recall"] == 0.0 and got["f1"] == 0.0
    assert got["accuracy"] == pytest.approx(0.6)
    # No FAKE in the truth at all: recall 0/0 is 0, and no ROC AUC (undefined with one class).
    only_real = metrics.classification(np.zeros(4), np.array([0.1, 0.9, 0.2, 0.3]))
    assert only_real["recall"] == 0.0 and only_real["f1"] == 0.0 and "roc_auc" not in only_real
    assert all(not math.isnan(v) for v in [*got.values(), *only_real.values()])
    assert metrics.f1(np.zeros(3), np.zeros(3)) == 0.0


def test_weighted_f1_is_point_four_clean_plus_point_six_adversarial() -> None:
    weights = config.load(Path(__file__).resolve().parents[2] / "params.yaml").evaluate.weights
    assert metrics.weighted_f1(0.9, 0.5, weights) == pytest.approx(0.4 * 0.9 + 0.6 * 0.5)
    assert metrics.weighted_f1(1.0, 1.0, weights) == pytest.approx(1.0)
    assert metrics.weighted_f1(0.8, 0.2, config.Weights(clean=0.5, adversarial=0.5)) == pytest.approx(0.5)


def test_roc_points_are_finite_and_span_the_corners() -> None:
    points = metrics.roc_points(Y, P)
    assert all(math.isfinite(v) for point in points for v in point.values())
    assert set(points[0]) == {"fpr", "tpr", "threshold"}
    assert (points[0]["fpr"], points[0]["tpr"]) == (0.0, 0.0)
    assert (points[-1]["fpr"], points[-1]["tpr"]) == (1.0, 1.0)
    assert all(0.0 <= p["threshold"] <= 1.0 for p in points)
    fprs = [p["fpr"] for p in points]
    assert fprs == sorted(fprs)
    # the trapezoid area under these points is the ROC AUC
    auc = sum((b["fpr"] - a["fpr"]) * (a["tpr"] + b["tpr"]) / 2 for a, b in zip(points, points[1:]))
    assert auc == pytest.approx(20 / 24)


def test_confusion_rows_label_real_and_fake() -> None:
    rows = reporting.confusion_rows(Y, P, threshold=0.5)
    assert len(rows) == len(Y)
    assert rows[0] == {"actual": "Fake", "predicted": "Fake"}
    assert rows[3] == {"actual": "Fake", "predicted": "Real"}
    assert rows[4] == {"actual": "Real", "predicted": "Fake"}
    assert rows[9] == {"actual": "Real", "predicted": "Real"}
    counts = {(a, p): sum(r == {"actual": a, "predicted": p} for r in rows)
              for a in ("Real", "Fake") for p in ("Real", "Fake")}
    assert counts == {("Fake", "Fake"): TP, ("Fake", "Real"): FN, ("Real", "Fake"): FP, ("Real", "Real"): TN}


def test_subset_is_stratified_seeded_and_all_when_unbounded():
    from pipeline.data.splits import stratified_subset as subset

    y = np.array([0] * 300 + [1] * 100)
    idx = subset(y, 40, seed=7)
    assert len(idx) == 40 and (y[idx] == 1).sum() == 10  # the 3:1 class ratio is kept
    assert np.array_equal(idx, subset(y, 40, seed=7)) and np.all(np.diff(idx) > 0)
    assert np.array_equal(subset(y, None, seed=7), np.arange(400))
    assert np.array_equal(subset(y, 1000, seed=7), np.arange(400))


WEIGHTS = config.Weights(clean=0.4, adversarial=0.6)
Y_BAL = np.array([0] * 50 + [1] * 50)


def test_robust_score_ranks_always_fake_and_attack_flipped_models_below_a_robust_one() -> None:
    right = Y_BAL.astype(float)
    robust = metrics.robust_score(Y_BAL, right, np.where(np.arange(100) % 10 == 0, 1 - right, right), WEIGHTS)
    always_fake = metrics.robust_score(Y_BAL, np.ones(100), np.ones(100), WEIGHTS)
    flipped = metrics.robust_score(Y_BAL, right, 1 - right, WEIGHTS)  # perfect when clean, every attack works
    fake_under_attack = metrics.robust_score(Y_BAL, right, np.ones(100), WEIGHTS)  # the collapse F1 rewards
    assert always_fake == pytest.approx(0.5) and flipped == pytest.approx(0.4)
    assert fake_under_attack == pytest.approx(0.4 + 0.6 * 0.5)
    assert robust == pytest.approx(0.4 + 0.6 * 0.9)
    assert robust > fake_under_attack > always_fake > flipped
    # ...whereas the mission's F1 with FAKE positive ranks the collapse above the robust model's adversarial set
    assert metrics.f1(Y_BAL, np.ones(100)) == pytest.approx(2 / 3)
    for measure in metrics.MEASURES:
        assert metrics.robust_score(Y_BAL, np.ones(100), np.ones(100), WEIGHTS, measure) <= 0.5
    assert metrics.reference(Y_BAL, WEIGHTS)["always_fake_robust_score"] == pytest.approx(0.5)
    assert metrics.reference(Y_BAL, WEIGHTS)["always_fake_weighted_f1"] == pytest.approx(2 / 3)


def test_worst_case_takes_the_wrong_side_per_image() -> None:
    y = np.array([1, 1, 0, 0])
    fgsm = np.array([0.9, 0.2, 0.1, 0.7])
    pgd = np.array([0.4, 0.8, 0.3, 0.6])
    assert metrics.worst_case(y, fgsm, pgd).tolist() == [0.4, 0.2, 0.3, 0.7]


def test_bootstrap_interval_is_seeded_and_covers_the_point_estimate() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p_clean = np.where(rng.random(400) < 0.9, y, 1 - y).astype(float)
    p_adv = np.where(rng.random(400) < 0.7, y, 1 - y).astype(float)
    p_worst = np.minimum(p_adv, p_clean) * y + np.maximum(p_adv, p_clean) * (1 - y)
    ci = metrics.bootstrap_ci(y, p_clean, p_adv, p_worst, WEIGHTS, n_resamples=500, seed=3)
    assert ci == metrics.bootstrap_ci(y, p_clean, p_adv, p_worst, WEIGHTS, n_resamples=500, seed=3)
    point = {"weighted_f1": metrics.weighted_f1(metrics.f1(y, p_clean), metrics.f1(y, p_adv), WEIGHTS),
             "robust_score": metrics.robust_score(y, p_clean, p_worst, WEIGHTS),
             "clean_balanced_accuracy": metrics.measure(y, p_clean),
             "adversarial_balanced_accuracy": metrics.measure(y, p_adv)}
    for key, value in point.items():
        assert ci[key]["low"] < value < ci[key]["high"], key
        assert ci[key]["high"] - ci[key]["low"] < 0.2  # 400 images: a few points wide, not the whole range


def brute_force_threshold(y, p_clean, p_adv, weights, name):
    scores = {*np.asarray(p_clean).tolist(), *np.asarray(p_adv).tolist()}
    candidates = sorted((scores | {0.5}) - {0.0, 1.0})
    if 1.0 in scores:  # the cut that calls only the saturated scores FAKE
        candidates.append((candidates[-1] + 1.0) / 2)
    scored = [(metrics.robust_score(y, p_clean, p_adv, weights, name, t), -abs(t - 0.5), t) for t in candidates]
    return max(scored)[2]


@pytest.mark.parametrize("name", metrics.MEASURES)
def test_best_threshold_is_the_exhaustive_search_vectorised(name: str) -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        y = rng.integers(0, 2, 60)
        p_clean = np.clip(0.35 * y + rng.random(60) * 0.65, 0, 1).round(2)  # rounded: ties on purpose
        p_adv = np.clip(0.2 * y + rng.random(60) * 0.8, 0, 1).round(2)
        got = metrics.best_threshold(y, p_clean, p_adv, WEIGHTS, name)
        want = brute_force_threshold(y, p_clean, p_adv, WEIGHTS, name)
        assert metrics.robust_score(y, p_clean, p_adv, WEIGHTS, name, got) == pytest.approx(
            metrics.robust_score(y, p_clean, p_adv, WEIGHTS, name, want), abs=1e-12)
        assert abs(got - 0.5) == pytest.approx(abs(want - 0.5), abs=1e-12)  # of the best, the nearest to 0.5
        assert metrics.robust_score(y, p_clean, p_adv, WEIGHTS, name, got) >= metrics.robust_score(
            y, p_clean, p_adv, WEIGHTS, name, 0.5)


def test_best_threshold_keeps_one_half_when_the_classes_are_apart_and_moves_when_scores_shift() -> None:
    apart = np.where(Y_BAL == 1, 0.95, 0.05)
    assert metrics.best_threshold(Y_BAL, apart, None, WEIGHTS) == 0.5
    shifted = np.where(Y_BAL == 1, 0.30, 0.10)  # a model whose FAKE scores all sit below 0.5
    t = metrics.best_threshold(Y_BAL, shifted, None, WEIGHTS)
    assert 0.10 < t <= 0.30 and metrics.measure(Y_BAL, shifted, "balanced_accuracy", t) == 1.0
    assert metrics.measure(Y_BAL, shifted, "balanced_accuracy", 0.5) == 0.5


def test_best_threshold_can_call_only_saturated_scores_fake() -> None:
    # float32's sigmoid gives exactly 1.0 above a logit of ~17: the best cut lies between 0.8 and 1.0
    y, p = np.array([1, 1, 1, 0, 0, 0]), np.array([1.0, 1.0, 1.0, 0.8, 0.3, 0.1])
    t = metrics.best_threshold(y, p, None, WEIGHTS)
    assert 0.8 < t < 1.0 and metrics.measure(y, p, "balanced_accuracy", t) == 1.0


def test_brier_and_reliability() -> None:
    assert metrics.brier(Y_BAL, Y_BAL.astype(float)) == 0.0
    assert metrics.brier(Y_BAL, np.full(100, 0.5)) == 0.25
    rows = metrics.reliability(Y, P, bins=5)
    assert sum(r["count"] for r in rows) == len(Y)
    top = next(r for r in rows if r["bin"] == 4)  # P 0.8 and 0.9: both FAKE
    assert top["fraction_fake"] == 1.0 and top["mean_predicted"] == pytest.approx(0.85)
    assert all(0 <= r["mean_predicted"] <= 1 and 0 <= r["fraction_fake"] <= 1 for r in rows)


# ----------------------------------------------------------------- cases bench/mutation.sh showed were not pinned


def test_scores_gathers_each_figure_under_its_name_at_the_threshold() -> None:
    cfg = config.load(Path(__file__).resolve().parents[2] / "params.yaml").evaluate.model_copy(
        update={"measure": "macro_f1", "weights": WEIGHTS})
    p_adv = np.array([0.3, 0.6, 0.5, 0.4, 0.7, 0.6, 0.8, 0.2, 0.1, 0.55])
    got = metrics.scores(Y, P, p_adv, cfg, threshold=0.55)
    want_f1, want_adv_f1 = metrics.f1(Y, P, 0.55), metrics.f1(Y, p_adv, 0.55)
    assert got == pytest.approx({
        "f1": want_f1, "macro_f1": metrics.measure(Y, P, "macro_f1", 0.55), "adv_f1": want_adv_f1,
        "adv_macro_f1": metrics.measure(Y, p_adv, "macro_f1", 0.55),
        "weighted_f1": 0.4 * want_f1 + 0.6 * want_adv_f1,
        "robust_score": metrics.robust_score(Y, P, p_adv, WEIGHTS, "macro_f1", 0.55)}, abs=0)
    assert got["f1"] != metrics.f1(Y, P, 0.5) and got["adv_f1"] != metrics.f1(Y, p_adv, 0.5)  # the threshold counts
    assert metrics.scores(Y, P, None, cfg, 0.55) == {"f1": want_f1, "macro_f1": got["macro_f1"]}


def test_log_loss_is_keras_clipped_binary_cross_entropy() -> None:
    y, p = np.array([1, 0, 1]), np.array([0.8, 0.25, 0.5])
    assert metrics.log_loss(y, p) == pytest.approx(-(math.log(0.8) + math.log(0.75) + math.log(0.5)) / 3, rel=1e-12)
    # a confident mistake costs -log(eps), not infinity; a sure right answer costs -log(1 - eps)
    assert metrics.log_loss([1], [0.0]) == pytest.approx(-math.log(1e-7), rel=1e-12)
    assert metrics.log_loss([0, 1], [0.0, 1.0]) == pytest.approx(-math.log1p(-1e-7), rel=1e-9)
    assert metrics.log_loss([1], [0.0], eps=1e-3) == pytest.approx(-math.log(1e-3), rel=1e-12)
    assert math.isnan(metrics.log_loss([], []))


def test_a_class_of_one_image_counts_fully() -> None:
    # one FAKE image, called FAKE: recall 1 (a ratio over a count of exactly 1 is a ratio, not "no images")
    got = metrics.classification([1, 0, 0], [0.9, 0.6, 0.1])
    assert got["recall"] == 1.0 and got["precision"] == 0.5 and got["recall_real"] == 0.5


def test_best_threshold_breaks_a_tie_towards_one_half_and_never_returns_zero() -> None:
    y = np.array([1, 0, 1, 0])  # cuts at 0.25 and at 0.65 both get 3 of 4 right; 0.65 is nearer 0.5
    assert metrics.best_threshold(y, np.array([0.25, 0.2, 0.65, 0.6]), None, WEIGHTS) == 0.65
    # scores of exactly 0: a cut at 0 (everything FAKE) would win on macro F1 here, but calls nothing by its score
    assert metrics.best_threshold(np.array([1, 1, 1, 0]), np.zeros(4), None, WEIGHTS, "macro_f1") == 0.5


def reference_bootstrap(y, p_clean, p_adv, p_worst, worst_index, n, seed, level, threshold):
    """The bootstrap written out one resample at a time, with the same draws as metrics.bootstrap_ci."""
    rng, y = np.random.default_rng(seed), np.asarray(y)
    sub = np.arange(len(y)) if worst_index is None else np.asarray(worst_index)
    draws = {k: [] for k in ("weighted_f1", "robust_score", "clean_balanced_accuracy", "adversarial_balanced_accuracy")}
    for start in range(0, n, 100):
        idx = rng.integers(0, len(y), (min(100, n - start), len(y)))
        idx_sub = idx if worst_index is None else rng.integers(0, len(sub), (len(idx), len(sub)))
        for i, j in zip(idx, idx_sub):
            draws["weighted_f1"].append(0.4 * metrics.f1(y[i], p_clean[i], threshold)
                                        + 0.6 * metrics.f1(y[i], p_adv[i], threshold))
            draws["robust_score"].append(metrics.robust_score(y[sub][j], p_clean[sub][j], p_worst[j], WEIGHTS,
                                                              threshold=threshold))
            draws["clean_balanced_accuracy"].append(metrics.measure(y[i], p_clean[i], threshold=threshold))
            draws["adversarial_balanced_accuracy"].append(metrics.measure(y[i], p_adv[i], threshold=threshold))
    tail = 100 * (1 - level) / 2
    return {(k, b): v for k, d in draws.items() for b, v in zip(("low", "high"), np.percentile(d, [tail, 100 - tail]))}


def flat(ci: dict) -> dict:
    return {(k, b): v for k, bounds in ci.items() for b, v in bounds.items()}


@pytest.mark.parametrize("subset", [False, True])
def test_bootstrap_interval_is_the_percentile_interval_of_the_resampled_figures(subset: bool) -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 30)
    p_clean, p_adv = rng.choice([0.2, 0.5, 0.8], 30), rng.choice([0.2, 0.5, 0.8], 30)  # some exactly on 0.5
    worst_index = np.arange(0, 30, 3) if subset else None
    p_worst = (rng.choice([0.2, 0.5, 0.8], 10) if subset else np.minimum(p_clean, p_adv))
    got = metrics.bootstrap_ci(y, p_clean, p_adv, p_worst, WEIGHTS, n_resamples=250, seed=2, level=0.8,
                               worst_index=worst_index)
    want = reference_bootstrap(y, p_clean, p_adv, p_worst, worst_index, 250, 2, 0.8, 0.5)
    assert flat(got) == pytest.approx(want, abs=1e-12)
    # the defaults: 1000 resamples, seed 0, 95 %
    assert flat(metrics.bootstrap_ci(y, p_clean, p_adv, p_worst, WEIGHTS, worst_index=worst_index)) == pytest.approx(
        reference_bootstrap(y, p_clean, p_adv, p_worst, worst_index, 1000, 0, 0.95, 0.5), abs=1e-12)


def test_reference_names_its_floors_and_scores_them_by_the_measure() -> None:
    got = metrics.reference(Y, WEIGHTS, "macro_f1")
    f1_all_fake = 2 * 4 / (2 * 4 + 6)  # every image called FAKE: 4 TP, 6 FP
    assert got == pytest.approx({"always_fake_f1": f1_all_fake, "always_fake_weighted_f1": f1_all_fake,
                                 "always_fake_robust_score": f1_all_fake / 2})  # macro F1: REAL's F1 is 0


def test_reliability_bins_in_float64_and_puts_one_in_the_last_bin() -> None:
    p = np.array([0.1, 0.2, 1.0], np.float32)  # float32, as a model gives them
    rows = metrics.reliability([0, 1, 1], p, bins=2)
    assert [r["bin"] for r in rows] == [0, 1] and rows[1]["count"] == 1  # P = 1.0 is in the top bin, not a third
    assert rows[0]["mean_predicted"] == (float(p[0]) + float(p[1])) / 2  # averaged in float64, not float32


def test_log_loss_clips_float32_scores_in_float64() -> None:
    # a float32 P(FAKE) of 1.0 for a REAL image: clipped to 1 - 1e-7 in float64, not to float32's 0.99999988
    assert metrics.log_loss([0], np.array([1.0], np.float32)) == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_reliability_has_ten_bins_by_default() -> None:
    assert [r["bin"] for r in metrics.reliability([0, 1], [0.05, 0.95])] == [0, 9]
