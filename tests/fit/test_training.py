"""pipeline.fit.training.choose_threshold: the decision threshold a trained model is stored with."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import config
from pipeline.fit import training
from pipeline.judge import metrics


def test_choose_threshold_fixed_or_by_the_selection_rule_on_clean_and_attacked_scores() -> None:
    evaluate = config.load(Path(__file__).resolve().parents[2] / "params.yaml").evaluate.model_copy(
        update={"measure": "macro_f1", "weights": config.Weights(clean=0.4, adversarial=0.6)})
    y = np.array([1, 1, 1, 0, 0])
    p_clean, p_attacked = np.array([0.8, 0.7, 0.7, 0.4, 0.9]), np.array([0.1, 0.35, 0.45, 0.6, 0.35])
    fixed = config.Threshold(rule="fixed", fixed=0.3)
    assert training.choose_threshold(fixed, evaluate, y, p_clean, p_attacked) == 0.3
    criterion = config.Threshold(rule="criterion", fixed=0.3)
    want = metrics.best_threshold(y, p_clean, p_attacked, evaluate.weights, "macro_f1")
    assert training.choose_threshold(criterion, evaluate, y, p_clean, p_attacked) == want
    assert want != metrics.best_threshold(y, p_clean, None, evaluate.weights, "macro_f1")  # the attacked set counts
    assert want != metrics.best_threshold(y, p_clean, p_attacked, evaluate.weights)  # and so does the measure
    assert training.choose_threshold(criterion, evaluate, y, p_clean) == metrics.best_threshold(
        y, p_clean, None, evaluate.weights, "macro_f1")
