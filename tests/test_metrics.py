"""pipeline.metrics and the confusion rows: checked against numbers worked out by hand. FAKE (1) is positive."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pipeline import config, evaluation, metrics

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
    got = metrics.classification(Y, P, threshold=0.5)
    assert got == pytest.approx({"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1,
                                 "roc_auc": auc})
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
    weights = config.load(Path(__file__).resolve().parents[1] / "params.yaml").evaluate.weights
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
    rows = evaluation.confusion_rows(Y, P, threshold=0.5)
    assert len(rows) == len(Y)
    assert rows[0] == {"actual": "Fake", "predicted": "Fake"}
    assert rows[3] == {"actual": "Fake", "predicted": "Real"}
    assert rows[4] == {"actual": "Real", "predicted": "Fake"}
    assert rows[9] == {"actual": "Real", "predicted": "Real"}
    counts = {(a, p): sum(r == {"actual": a, "predicted": p} for r in rows)
              for a in ("Real", "Fake") for p in ("Real", "Fake")}
    assert counts == {("Fake", "Fake"): TP, ("Fake", "Real"): FN, ("Real", "Fake"): FP, ("Real", "Real"): TN}


def test_curve_subset_is_stratified_seeded_and_all_when_unbounded():
    from pipeline.evaluation import curve_subset

    y = np.array([0] * 300 + [1] * 100)
    idx = curve_subset(y, 40, seed=7)
    assert len(idx) == 40 and (y[idx] == 1).sum() == 10  # the 3:1 class ratio is kept
    assert np.array_equal(idx, curve_subset(y, 40, seed=7)) and np.all(np.diff(idx) > 0)
    assert np.array_equal(curve_subset(y, None, seed=7), np.arange(400))
    assert np.array_equal(curve_subset(y, 1000, seed=7), np.arange(400))
