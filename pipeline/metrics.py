"""Classification metrics with FAKE (1) as the positive class, and the project's weighted score."""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from pipeline import config


def classification(y_true: np.ndarray, p_fake: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (FAKE positive) and ROC AUC (when both classes are present)."""
    y_true = np.asarray(y_true).astype(int)
    y_pred = (np.asarray(p_fake) >= threshold).astype(int)
    out = {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "precision": float(skm.precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(skm.recall_score(y_true, y_pred, zero_division=0)),
        "f1": float(skm.f1_score(y_true, y_pred, zero_division=0)),
    }
    if len(np.unique(y_true)) == 2:
        out["roc_auc"] = float(skm.roc_auc_score(y_true, p_fake))
    return out


def f1(y_true: np.ndarray, p_fake: np.ndarray, threshold: float = 0.5) -> float:
    return float(skm.f1_score(np.asarray(y_true).astype(int), (np.asarray(p_fake) >= threshold).astype(int),
                              zero_division=0))


def weighted_f1(f1_clean: float, f1_adversarial: float, weights: config.Weights) -> float:
    """The score the project is judged on: 0.4 · F1(clean) + 0.6 · F1(adversarial) by default."""
    return weights.clean * f1_clean + weights.adversarial * f1_adversarial


def roc_points(y_true: np.ndarray, p_fake: np.ndarray) -> list[dict[str, float]]:
    fpr, tpr, thresholds = skm.roc_curve(np.asarray(y_true).astype(int), p_fake)
    thresholds = np.minimum(thresholds, 1.0)  # sklearn puts +inf first; keep the JSON/CSV finite
    return [{"fpr": float(a), "tpr": float(b), "threshold": float(t)} for a, b, t in zip(fpr, tpr, thresholds)]


def constant_fake(y_true: np.ndarray, weights: config.Weights) -> dict[str, float]:
    """The score of a model that calls everything FAKE: immune to any attack, so its weighted F1 (≈ 0.667 on a
    balanced set) is the floor a real classifier has to beat, not a sign of robustness."""
    f1_all_fake = f1(y_true, np.ones(len(y_true)))
    return {"always_fake_f1": f1_all_fake, "always_fake_weighted_f1": weighted_f1(f1_all_fake, f1_all_fake, weights)}
