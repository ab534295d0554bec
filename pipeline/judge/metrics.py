"""Classification metrics with FAKE (1) as the positive class, the mission's weighted F1, and the one selection
rule that tuning, advtrain's epoch choice and the registry's champion all use: :func:`robust_score`.

F1 with FAKE positive rewards a model that calls everything FAKE (0.667 on a balanced set, and no attack moves it),
so nothing here selects on it. :func:`robust_score` weights the same 0.4/0.6 over a measure that counts both
classes (balanced accuracy by default, or macro F1), where calling everything one class scores 0.5 and a model
that an attack flips scores below that.
"""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from pipeline import config

MEASURES = ("balanced_accuracy", "macro_f1")


def _counts(y: np.ndarray, pred: np.ndarray, idx: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Confusion counts (tp, fp, fn, tn); with ``idx`` (resamples x n indices) one count per resample."""
    y, pred = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    cells = (y & pred, ~y & pred, y & ~pred, ~y & ~pred)
    if idx is None:
        return tuple(np.float64(c.sum()) for c in cells)
    return tuple(c[idx].sum(-1).astype(np.float64) for c in cells)


def _ratio(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), 0.0)


def _from_counts(tp, fp, fn, tn) -> dict[str, np.ndarray]:
    """Every count-based figure, as numpy expressions, so point estimates and bootstrap resamples share them."""
    recall_fake, recall_real = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    f1_fake, f1_real = _ratio(2 * tp, 2 * tp + fp + fn), _ratio(2 * tn, 2 * tn + fn + fp)
    n = tp + fp + fn + tn
    return {
        "accuracy": _ratio(tp + tn, n), "precision": _ratio(tp, tp + fp), "recall": recall_fake, "f1": f1_fake,
        "balanced_accuracy": (recall_fake + recall_real) / 2, "macro_f1": (f1_fake + f1_real) / 2,
        "recall_real": recall_real, "recall_fake": recall_fake, "fake_share": _ratio(tp + fp, n),
    }


def classification(y_true: np.ndarray, p_fake: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (FAKE positive), balanced accuracy, macro F1, the recall of each class, the
    share of images called FAKE, and ROC AUC (when both classes are present)."""
    y_true = np.asarray(y_true).astype(int)
    out = {k: float(v) for k, v in _from_counts(*_counts(y_true, np.asarray(p_fake) >= threshold)).items()}
    if len(np.unique(y_true)) == 2:
        out["roc_auc"] = float(skm.roc_auc_score(y_true, p_fake))
    return out


def f1(y_true: np.ndarray, p_fake: np.ndarray, threshold: float = 0.5) -> float:
    return float(_from_counts(*_counts(y_true, np.asarray(p_fake) >= threshold))["f1"])


def measure(y_true: np.ndarray, p_fake: np.ndarray, name: str = "balanced_accuracy", threshold: float = 0.5) -> float:
    """A measure that counts both classes (one of :data:`MEASURES`): 0.5 for any constant answer."""
    return float(_from_counts(*_counts(y_true, np.asarray(p_fake) >= threshold))[name])


def weighted_f1(f1_clean: float, f1_adversarial: float, weights: config.Weights) -> float:
    """The mission's headline: 0.4 · F1(clean) + 0.6 · F1(adversarial) by default, FAKE positive."""
    return weights.clean * f1_clean + weights.adversarial * f1_adversarial


def robust_score(y: np.ndarray, p_clean: np.ndarray, p_attacked: np.ndarray, weights: config.Weights,
                 measure_name: str = "balanced_accuracy", threshold: float = 0.5) -> float:
    """THE selection rule: ``weights.clean · m(clean) + weights.adversarial · m(attacked)`` with ``m`` a measure
    that counts both classes. A constant answer scores 0.5, a model an attack flips scores below 0.5."""
    return (weights.clean * measure(y, p_clean, measure_name, threshold)
            + weights.adversarial * measure(y, p_attacked, measure_name, threshold))


def best_threshold(y: np.ndarray, p_clean: np.ndarray, p_attacked: np.ndarray | None, weights: config.Weights,
                   measure_name: str = "balanced_accuracy") -> float:
    """The threshold on P(FAKE) that maximises :func:`robust_score` (or, without attacked scores, the measure on
    clean ones) over every threshold that changes an answer; of equally good ones, the nearest to 0.5, so a model
    whose classes are well apart keeps the usual threshold. Exact and vectorised: one sort per set."""
    y = np.asarray(y).astype(bool)
    sets = [(1.0 if p_attacked is None else weights.clean, np.asarray(p_clean, np.float64))]
    if p_attacked is not None:
        sets.append((weights.adversarial, np.asarray(p_attacked, np.float64)))
    every = np.concatenate([p for _, p in sets])
    candidates = np.unique(np.concatenate([every, [0.5]]))
    candidates = candidates[(candidates > 0.0) & (candidates < 1.0)]  # a usable threshold lies strictly inside
    if (every >= 1.0).any():  # scores of exactly 1 (a saturated sigmoid): the cut below them alone, halfway up
        candidates = np.append(candidates, (candidates.max() + 1.0) / 2)
    score = np.zeros(len(candidates))
    for weight, p in sets:
        fake, real = np.sort(p[y]), np.sort(p[~y])
        tp = (len(fake) - np.searchsorted(fake, candidates, "left")).astype(np.float64)  # called FAKE: p >= threshold
        fp = (len(real) - np.searchsorted(real, candidates, "left")).astype(np.float64)
        score += weight * _from_counts(tp, fp, len(fake) - tp, len(real) - fp)[measure_name]
    tied = candidates[score >= score.max() - 1e-12]
    return float(tied[np.argmin(np.abs(tied - 0.5))])


def scores(y: np.ndarray, p_clean: np.ndarray, p_attacked: np.ndarray | None, cfg: config.Evaluate,
           threshold: float = 0.5) -> dict[str, float]:
    """The figures every stage selects and reports by, computed in this one place: F1 and ``cfg.measure`` of the
    clean and the attacked set, the mission's ``weighted_f1`` and :func:`robust_score`. Clean figures only when
    ``p_attacked`` is None."""
    m = cfg.measure
    out = {"f1": f1(y, p_clean, threshold), m: measure(y, p_clean, m, threshold)}
    if p_attacked is not None:
        out.update({"adv_f1": f1(y, p_attacked, threshold), f"adv_{m}": measure(y, p_attacked, m, threshold)})
        out["weighted_f1"] = weighted_f1(out["f1"], out["adv_f1"], cfg.weights)
        out["robust_score"] = robust_score(y, p_clean, p_attacked, cfg.weights, m, threshold)
    return out


def worst_case(y: np.ndarray, *p_attacked: np.ndarray) -> np.ndarray:
    """Per image, the attacked P(FAKE) furthest on the wrong side over several attacks (the lowest for a FAKE
    image, the highest for a REAL one): an image counts as robust only if every attack failed on it."""
    stacked = np.stack([np.asarray(p, np.float64) for p in p_attacked])
    return np.where(np.asarray(y).astype(bool), stacked.min(0), stacked.max(0))


def reference(y: np.ndarray, weights: config.Weights, measure_name: str = "balanced_accuracy") -> dict[str, float]:
    """The scores of a model that calls everything FAKE: immune to any attack, so these are floors to beat, not
    signs of robustness (its weighted F1 is ≈ 0.667 on a balanced set; its robust_score 0.5)."""
    ones = np.ones(len(y))
    f1_all_fake = f1(y, ones)
    return {"always_fake_f1": f1_all_fake, "always_fake_weighted_f1": weighted_f1(f1_all_fake, f1_all_fake, weights),
            "always_fake_robust_score": robust_score(y, ones, ones, weights, measure_name)}


def bootstrap_ci(y: np.ndarray, p_clean: np.ndarray, p_adversarial: np.ndarray, p_worst: np.ndarray,
                 weights: config.Weights, measure_name: str = "balanced_accuracy", threshold: float = 0.5,
                 n_resamples: int = 1000, seed: int = 0, level: float = 0.95,
                 worst_index: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """Seeded percentile-bootstrap intervals (test images resampled with replacement) for the headline figures:
    ``weighted_f1`` (clean + ``p_adversarial``), ``robust_score`` (clean + ``p_worst``) and the balanced accuracy
    of each set. ``p_worst`` may cover only the images ``worst_index`` (a diagnostic attack run on a subset): then
    robust_score is resampled over those images alone, as it is computed. Two runs whose intervals overlap widely
    are not shown to differ by this test set."""
    y = np.asarray(y).astype(bool)
    sub = np.arange(len(y)) if worst_index is None else np.asarray(worst_index)
    rng = np.random.default_rng(seed)
    preds = {"clean": np.asarray(p_clean) >= threshold, "adversarial": np.asarray(p_adversarial) >= threshold}
    robust_preds = {"clean": preds["clean"][sub], "worst": np.asarray(p_worst) >= threshold}
    draws: dict[str, list[np.ndarray]] = {k: [] for k in ("weighted_f1", "robust_score", "clean_balanced_accuracy",
                                                         "adversarial_balanced_accuracy")}
    for start in range(0, n_resamples, 100):  # 100 resamples at a time keeps the index matrix small
        size = min(100, n_resamples - start)
        idx = rng.integers(0, len(y), (size, len(y)))
        s = {k: _from_counts(*_counts(y, p, idx)) for k, p in preds.items()}
        idx_sub = idx if worst_index is None else rng.integers(0, len(sub), (size, len(sub)))
        r = {k: _from_counts(*_counts(y[sub], p, idx_sub)) for k, p in robust_preds.items()}
        draws["weighted_f1"].append(weights.clean * s["clean"]["f1"] + weights.adversarial * s["adversarial"]["f1"])
        draws["robust_score"].append(weights.clean * r["clean"][measure_name]
                                     + weights.adversarial * r["worst"][measure_name])
        draws["clean_balanced_accuracy"].append(s["clean"]["balanced_accuracy"])
        draws["adversarial_balanced_accuracy"].append(s["adversarial"]["balanced_accuracy"])
    tail = 100 * (1 - level) / 2
    bounds = {k: np.percentile(np.concatenate(d), [tail, 100 - tail]) for k, d in draws.items()}
    return {k: {"low": float(lo), "high": float(hi)} for k, (lo, hi) in bounds.items()}


def brier(y_true: np.ndarray, p_fake: np.ndarray) -> float:
    """Mean squared error of P(FAKE) against the label: 0 is perfect, 0.25 a constant 0.5."""
    return float(np.mean((np.asarray(p_fake, np.float64) - np.asarray(y_true, np.float64)) ** 2))


def log_loss(y_true: np.ndarray, p_fake: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, with P(FAKE) clipped to [eps, 1 - eps] as Keras's loss clips it."""
    p = np.clip(np.asarray(p_fake, np.float64), eps, 1 - eps)
    y = np.asarray(y_true, np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))) if len(y) else float("nan")


def reliability(y_true: np.ndarray, p_fake: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Per equal-width bin of P(FAKE) that holds images: the mean predicted P(FAKE) and the share really FAKE (on
    the diagonal when calibrated), and how many images."""
    p, y = np.asarray(p_fake, np.float64), np.asarray(y_true, np.float64)
    index = np.minimum((p * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        inside = index == b
        if inside.any():
            rows.append({"bin": b, "mean_predicted": float(p[inside].mean()), "fraction_fake": float(y[inside].mean()),
                         "count": int(inside.sum())})
    return rows


def roc_points(y_true: np.ndarray, p_fake: np.ndarray) -> list[dict[str, float]]:
    fpr, tpr, thresholds = skm.roc_curve(np.asarray(y_true).astype(int), p_fake)
    thresholds = np.minimum(thresholds, 1.0)  # sklearn puts +inf first; keep the JSON/CSV finite
    return [{"fpr": float(a), "tpr": float(b), "threshold": float(t)} for a, b, t in zip(fpr, tpr, thresholds)]
