"""Evaluation on Test_dataset_1 (clean) and Test_dataset_2 (the same images attacked white-box against the model
being evaluated with the mission's attack, rounded to 8 bits exactly as the PNG files that hold them), plus a
stronger diagnostic attack (PGD) so that gradient masking or an FGSM-only defence shows up.

Every set gets figures that count both classes (balanced accuracy, the recall of each class, ROC AUC, the share
called FAKE) beside the mission's F1; the selection rule :func:`pipeline.metrics.robust_score` takes, per image,
the worse of the two attacks."""
from __future__ import annotations

import hashlib
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
from PIL import Image

from pipeline import config, corruptions, filetree, inference, metrics, registry
from pipeline.attacks import Attacker, to_uint8
from pipeline.data import stratified_subset


@dataclass
class Result:
    p_clean: np.ndarray
    x_adv: np.ndarray  # uint8, what Test_dataset_2 holds (the mission's attack)
    p_adv: np.ndarray
    p_diagnostic: np.ndarray
    sets: dict[str, dict[str, float]]  # clean, adversarial, diagnostic, worst -> metrics
    weighted_f1: float
    robust_score: float
    curve: list[dict] = field(default_factory=list)  # F1 and balanced accuracy per epsilon
    diagnosed: np.ndarray | None = None  # indices of the images the diagnostic attack ran on (p_diagnostic's order)
    corrupted: dict[str, dict[str, float]] = field(default_factory=dict)  # corruption -> metrics, same subset

    @property
    def clean(self) -> dict[str, float]:
        return self.sets["clean"]

    @property
    def adversarial(self) -> dict[str, float]:
        return self.sets["adversarial"]

    def line(self, cfg: config.Evaluate) -> str:
        ba = {k: v["balanced_accuracy"] for k, v in self.sets.items()}
        return (f"robust_score {self.robust_score:.4f}, weighted_f1 {self.weighted_f1:.4f}; balanced accuracy clean "
                f"{ba['clean']:.3f}, {cfg.attack.describe()} {ba['adversarial']:.3f}, {cfg.diagnostic.describe()} "
                f"{ba['diagnostic']:.3f}")

    def at_threshold(self, y: np.ndarray, cfg: config.Evaluate, threshold: float) -> dict[str, float]:
        """The headline figures had the model been judged at ``threshold`` instead of its own: beside the stored
        threshold's, they show what choosing it bought."""
        sub = np.arange(len(y)) if self.diagnosed is None else self.diagnosed
        p_worst = metrics.worst_case(y[sub], self.p_adv[sub], self.p_diagnostic)
        m = cfg.measure
        return {"threshold": threshold,
                "weighted_f1": metrics.weighted_f1(metrics.f1(y, self.p_clean, threshold),
                                                   metrics.f1(y, self.p_adv, threshold), cfg.weights),
                "robust_score": metrics.robust_score(y[sub], self.p_clean[sub], p_worst, cfg.weights, m, threshold),
                **{f"{k}_{m}": metrics.measure(labels, p, m, threshold) for k, labels, p in
                   (("clean", y, self.p_clean), ("adversarial", y, self.p_adv),
                    ("diagnostic", y[sub], self.p_diagnostic), ("worst", y[sub], p_worst))}}

    def summary(self, reference: dict[str, float]) -> dict:
        return {"weighted_f1": self.weighted_f1, "robust_score": self.robust_score,
                "weighted_f1_minus_always_fake": self.weighted_f1 - reference["always_fake_weighted_f1"],
                **self.sets, **({"corruptions": self.corrupted} if self.corrupted else {})}

    def corruption_rows(self, name: str) -> list[dict]:
        """One row per corruption (``none`` first: the clean images of the same subset), for plots."""
        return [{"model": name, "corruption": k, "balanced_accuracy": m["balanced_accuracy"],
                 "roc_auc": m.get("roc_auc", float("nan"))} for k, m in self.corrupted.items()]


def evaluate(model: keras.Model, x: np.ndarray, y: np.ndarray, cfg: config.Evaluate, seed: int,
             threshold: float = 0.5, name: str = "model", engine: config.Inference = inference.AUTO) -> Result:
    """Clean, mission-attacked and diagnostic-attacked metrics, the weighted F1, the robust score, and the curve
    along ``cfg.epsilons`` (the mission's attack kind). Attacks need TensorFlow's gradients; every forward pass
    runs on the inference ``engine``.

    The diagnostic attack (PGD: ``steps`` gradient passes an image) runs on a seeded, stratified subset of
    ``cfg.diagnostic_images`` (all images when null), and so do the figures built on it: ``diagnostic``, ``worst``
    and ``robust_score`` (both its terms, so that they count the same images)."""
    forward = inference.runner(model, engine)
    bs = cfg.batch_size

    def bar(text: str) -> str | None:  # progress bars on a terminal only, not in logs
        return f"{name}: {text}" if sys.stderr.isatty() else None

    def p_fake(images: np.ndarray, text: str | None = None) -> np.ndarray:
        return forward(images, bs, bar(text) if text else None)[:, 0]

    p_clean = p_fake(x, "clean")
    attacker = Attacker(model, cfg.attack, seed)
    # The curve is on a seeded subset (all images when curve_images is null): it needs an attack pass per epsilon,
    # but for FGSM, whose direction does not depend on epsilon, the mission's set and the curve share one pass.
    idx = stratified_subset(y, cfg.curve_images, seed)
    others = [e for e in cfg.epsilons if e not in (0, cfg.attack.epsilon)]
    signs = attacker.signs(x, y, bs, bar(cfg.attack.describe())) if cfg.attack.name == "fgsm" else None
    if signs is None:
        x_adv = to_uint8(attacker.perturb(x, y, bs, progress=bar(cfg.attack.describe())))
    else:
        x_adv = attacker.sweep(x, y, [cfg.attack.epsilon], bs, signs=signs)[cfg.attack.epsilon]
    p_adv = p_fake(x_adv)
    sub = stratified_subset(y, cfg.diagnostic_images, seed)
    diagnostic = Attacker(model, cfg.diagnostic, seed)
    p_diag = p_fake(to_uint8(diagnostic.perturb(x[sub], y[sub], bs, progress=bar(cfg.diagnostic.describe()))))
    p_worst = metrics.worst_case(y[sub], p_adv[sub], p_diag)
    # No attacker: what a re-save, a resize, a blur or sensor noise on the way does (pipeline/corruptions.py).
    corrupted = {c.describe(): metrics.classification(y[sub], p_fake(corruptions.apply(x[sub], c, seed)), threshold)
                 for c in cfg.corruptions}
    if corrupted:  # the same images uncorrupted, to read the others against
        corrupted = {"none": metrics.classification(y[sub], p_clean[sub], threshold), **corrupted}
    sets = {k: metrics.classification(labels, p, threshold) for k, labels, p in
            (("clean", y, p_clean), ("adversarial", y, p_adv), ("diagnostic", y[sub], p_diag),
             ("worst", y[sub], p_worst))}
    weighted = metrics.weighted_f1(sets["clean"]["f1"], sets["adversarial"]["f1"], cfg.weights)
    robust = metrics.robust_score(y[sub], p_clean[sub], p_worst, cfg.weights, cfg.measure, threshold)

    attacked = attacker.sweep(x[idx], y[idx], others, bs, bar("robustness curve"),
                              None if signs is None else signs[idx]) if others else {}
    curve = []
    for eps in cfg.epsilons:
        if eps == 0:
            p = p_clean[idx]
        elif eps == cfg.attack.epsilon:
            p = p_adv[idx]
        else:
            p = p_fake(attacked.pop(eps))
        curve.append({"model": name, "epsilon": float(eps), "f1": metrics.f1(y[idx], p, threshold),
                      "balanced_accuracy": metrics.measure(y[idx], p, "balanced_accuracy", threshold)})
    return Result(p_clean, x_adv, p_adv, p_diag, sets, weighted, robust, curve, sub, corrupted)


def rescore(name: str, version: str, x: np.ndarray, y: np.ndarray, cfg: config.Evaluate, seed: int,
            threshold_rule: Any, engine: config.Inference = inference.AUTO) -> registry.Standing:
    """A registered version's scores under this protocol, attacked white-box against itself and judged at its own
    stored threshold (0.5 for a version that stored none): what the champion rule needs when the champion's stored
    scores come from another protocol."""
    from pipeline.predicting import load_with_threshold, resolve_threshold

    model, stored = load_with_threshold(f"models:/{name}/{version}")
    threshold = resolve_threshold(None, stored, 0.5)
    result = evaluate(model, x, y, cfg, seed, threshold, f"v{version}", engine)
    return registry.Standing(str(version), result.robust_score, result.weighted_f1,
                             protocol_id(protocol(cfg, x, y, seed, threshold_rule)))


def intervals(result: Result, y: np.ndarray, cfg: config.Evaluate, seed: int, threshold: float) -> dict:
    """Seeded bootstrap 95 % intervals of the headline figures (empty when ``cfg.bootstrap`` is 0); robust_score's
    over the images the diagnostic attack ran on, as the score itself."""
    if not cfg.bootstrap:
        return {}
    sub = np.arange(len(y)) if result.diagnosed is None else result.diagnosed
    p_worst = metrics.worst_case(y[sub], result.p_adv[sub], result.p_diagnostic)
    return metrics.bootstrap_ci(y, result.p_clean, result.p_adv, p_worst, cfg.weights, cfg.measure, threshold,
                                cfg.bootstrap, seed, worst_index=sub)


def protocol(cfg: config.Evaluate, x: np.ndarray, y: np.ndarray, seed: int, threshold: Any) -> dict:
    """Everything a score depends on besides the model: two scores compare only when their protocols match.
    ``threshold`` is how each model's threshold is set (params ``threshold``), each model being judged at its own."""
    h = hashlib.sha256(np.ascontiguousarray(x).tobytes())
    h.update(np.asarray(y, np.uint8).tobytes())
    return {"attack": cfg.attack.model_dump(mode="json"), "diagnostic": cfg.diagnostic.model_dump(mode="json"),
            "diagnostic_images": cfg.diagnostic_images,
            "test_sha256": h.hexdigest()[:16], "weights": cfg.weights.model_dump(mode="json"),
            "measure": cfg.measure, "threshold": threshold, "seed": seed}


def protocol_id(proto: dict) -> str:
    return hashlib.sha256(json.dumps(proto, sort_keys=True).encode()).hexdigest()[:16]


def write_png_set(x: np.ndarray, names: list[str], target: Path) -> None:
    """Images as lossless PNG in CIFAKE layout (``REAL/…``, ``FAKE/…``) in ``target``, a zip (or a folder):
    JPEG would erase the perturbation. Replaced whole at the end, so a half-written set is never left."""
    with filetree.writer(target) as put:
        for img, name in zip(x, names):
            buf = io.BytesIO()
            Image.fromarray(img, "RGB").save(buf, format="PNG", compress_level=1)
            put(Path(name).with_suffix(".png").as_posix(), buf.getvalue())
