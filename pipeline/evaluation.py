"""Evaluation on Test_dataset_1 (clean) and Test_dataset_2 (the same images attacked white-box against the model
being evaluated, rounded to 8 bits exactly as the PNG files that hold them)."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
from PIL import Image

from pipeline import config, metrics
from pipeline.attacks import Attacker, to_uint8
from pipeline.io import atomic_dir
from pipeline.model import batched, forward_fn


@dataclass
class Result:
    p_clean: np.ndarray
    x_adv: np.ndarray  # uint8, what Test_dataset_2 holds
    p_adv: np.ndarray
    clean: dict[str, float]
    adversarial: dict[str, float]
    weighted_f1: float
    curve: list[dict] = field(default_factory=list)  # F1 per epsilon

    def summary(self) -> dict:
        return {"clean": self.clean, "adversarial": self.adversarial, "weighted_f1": self.weighted_f1}


def evaluate(model: keras.Model, x: np.ndarray, y: np.ndarray, cfg: config.Evaluate, seed: int,
             threshold: float = 0.5, name: str = "model") -> Result:
    """Clean and adversarial metrics, the weighted score, and F1 along ``cfg.epsilons`` (same attack kind)."""
    fn = forward_fn(model)
    bs = cfg.batch_size
    attacker = Attacker(model, cfg.attack, seed)

    def bar(text: str) -> str | None:  # progress bars on a terminal only, not in logs
        return f"{name}: {text}" if sys.stderr.isatty() else None

    p_clean = batched(fn, x, bs, progress=bar("clean"))[:, 0]
    x_adv = to_uint8(attacker.perturb(x, y, bs, progress=bar(f"{cfg.attack.name} eps {cfg.attack.epsilon:g}")))
    p_adv = batched(fn, x_adv, bs)[:, 0]
    clean, adv = metrics.classification(y, p_clean, threshold), metrics.classification(y, p_adv, threshold)
    # The curve is F1 along cfg.epsilons on a seeded subset (all images when curve_images is null): at CIFAKE
    # scale one attack pass over 20,000 images costs about a minute here, and the curve needs one per epsilon.
    idx = curve_subset(y, cfg.curve_images, seed)
    others = [e for e in cfg.epsilons if e not in (0, cfg.attack.epsilon)]
    attacked = attacker.sweep(x[idx], y[idx], others, bs, progress=bar("robustness curve")) if others else {}
    curve = []
    for eps in cfg.epsilons:
        if eps == 0:
            p = p_clean[idx]
        elif eps == cfg.attack.epsilon:
            p = p_adv[idx]
        else:
            p = batched(fn, attacked.pop(eps), bs)[:, 0]
        curve.append({"model": name, "epsilon": float(eps), "f1": metrics.f1(y[idx], p, threshold)})
    return Result(p_clean, x_adv, p_adv, clean, adv, metrics.weighted_f1(clean["f1"], adv["f1"], cfg.weights), curve)


def curve_subset(y: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded, class-stratified subset of ``n`` images (all of them when ``n`` is None)."""
    if n is None or n >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    share = n / len(y)
    parts = [rng.permutation(np.flatnonzero(y == c))[: max(1, round(share * (y == c).sum()))] for c in np.unique(y)]
    return np.sort(np.concatenate(parts))


def write_png_set(x: np.ndarray, names: list[str], target: Path) -> None:
    """Images as lossless PNG under ``target`` in CIFAKE layout (``REAL/…``, ``FAKE/…``): JPEG would erase the
    perturbation. Written to a temporary folder and renamed, so a half-written set is never left."""
    with atomic_dir(target) as tmp:
        for img, name in zip(x, names):
            path = tmp / Path(name).with_suffix(".png")
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, "RGB").save(path, format="PNG", compress_level=1)


def confusion_rows(y: np.ndarray, p: np.ndarray, threshold: float) -> list[dict]:
    """One row per image, the shape DVC's confusion template reads."""
    label = np.array(["Real", "Fake"])
    return [{"actual": a, "predicted": b} for a, b in zip(label[y.astype(int)], label[(p >= threshold).astype(int)])]
