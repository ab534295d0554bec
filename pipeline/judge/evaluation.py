"""Evaluation on Test_dataset_1 (clean) and Test_dataset_2 (the same images attacked white-box against the model
being evaluated with the mission's attack, rounded to 8 bits exactly as the PNG files that hold them), plus a
stronger diagnostic attack (PGD) so that gradient masking or an FGSM-only defence shows up, and the attacks of
``evaluate.attacks`` beside them: APGD-CE (white-box), Square (black-box) and a transfer attack from the undefended
model.

Every set gets figures that count both classes (balanced accuracy, the recall of each class, ROC AUC, the share
called FAKE) beside the mission's F1; the selection rule :func:`pipeline.judge.metrics.robust_score` takes, per image,
the worst of all the attacks (``worst``). When a gradient-free attack (Square, transfer) beats the white-box ones
by more than the bootstrap interval, the defence is reported as gradient-masked (:func:`gradient_masking`)."""
from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
from PIL import Image

from pipeline import config
from pipeline.data import filetree
from pipeline.data.splits import stratified_subset
from pipeline.judge import cache, corruptions, metrics, registry
from pipeline.judge.attacks import APGD, Attacker, SquareAttack, logit_forward, to_uint8
from pipeline.model import inference
from pipeline.model.twin import logits_model

CORRUPTION_COLUMNS = ("model", "corruption", "balanced_accuracy", "roc_auc")  # plots/corruptions_*.csv


@dataclass
class Result:
    p_clean: np.ndarray
    x_adv: np.ndarray  # uint8, what Test_dataset_2 holds (the mission's attack)
    p_adv: np.ndarray
    p_diagnostic: np.ndarray
    sets: dict[str, dict[str, float]]  # clean, adversarial, diagnostic, worst -> metrics
    threshold: float  # the one the model was judged at (its own)
    weighted_f1: float
    robust_score: float
    curve: list[dict] = field(default_factory=list)  # F1 and balanced accuracy per epsilon
    diagnosed: np.ndarray | None = None  # indices of the images the diagnostic attack ran on (p_diagnostic's order)
    corrupted: dict[str, dict[str, float]] = field(default_factory=dict)  # corruption -> metrics, same subset
    p_worst: np.ndarray | None = None  # per diagnosed image, the worst of every attack (p_diagnostic's order)
    masking: dict[str, dict] = field(default_factory=dict)  # gradient-free attack -> its test against white-box
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each pass: where evaluate's time goes
    cached: list[str] = field(default_factory=list)  # the passes read back from the cache (pipeline/judge/cache.py)
    precisions: dict[str, str] = field(default_factory=dict)  # pass -> the precision its forward pass ran in, why
    # What this run's attack passes cost (those read back from the cache: nothing): images through the input
    # gradient, and Square's forward queries. The attacks let fooled images go, so these, not the budgets, are the
    # work (bench/fullscale.py's floor).
    gradients: dict[str, int] = field(default_factory=dict)
    queries: dict[str, int] = field(default_factory=dict)

    @property
    def clean(self) -> dict[str, float]:
        return self.sets["clean"]

    @property
    def adversarial(self) -> dict[str, float]:
        return self.sets["adversarial"]

    def line(self, cfg: config.Evaluate) -> str:
        ba = {k: v["balanced_accuracy"] for k, v in self.sets.items()}
        extra = "".join(f", {a.name} {ba[a.name]:.3f}" for a in cfg.attacks if a.name in ba)
        masked = [k for k, m in self.masking.items() if m["masked"]]
        return (f"robust_score {self.robust_score:.4f}, weighted_f1 {self.weighted_f1:.4f}; balanced accuracy clean "
                f"{ba['clean']:.3f}, {cfg.attack.describe()} {ba['adversarial']:.3f}, {cfg.diagnostic.describe()} "
                f"{ba['diagnostic']:.3f}{extra}, worst {ba['worst']:.3f}"
                + (f"; GRADIENT MASKING: {', '.join(masked)} beat the white-box attacks" if masked else ""))

    def at_threshold(self, y: np.ndarray, cfg: config.Evaluate, threshold: float) -> dict[str, float]:
        """The headline figures had the model been judged at ``threshold`` instead of its own: beside the stored
        threshold's, they show what choosing it bought."""
        sub = np.arange(len(y)) if self.diagnosed is None else self.diagnosed
        p_worst = self.p_worst
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
                **self.sets, **({"corruptions": self.corrupted} if self.corrupted else {}),
                **({"gradient_masking": self.masking} if self.masking else {})}

    def report(self, y: np.ndarray, cfg: config.Evaluate, seed: int, reference: dict[str, float]) -> dict:
        """Everything metrics/evaluate.json says of this model: :meth:`summary`, its threshold, calibration, the
        same figures at 0.5 and the bootstrap intervals."""
        return {**self.summary(reference), "threshold": self.threshold,
                **{f"brier_{k}": metrics.brier(y, p) for k, p in
                   (("clean", self.p_clean), ("adversarial", self.p_adv))},
                "at_0.5": self.at_threshold(y, cfg, REFERENCE_THRESHOLD),
                "ci95": intervals(self, y, cfg, seed, self.threshold)}

    def costs(self, name: str, cache_dir: Path | None, precisions: bool = False) -> str:
        """Where this model's evaluate time went, which passes were read back from the cache and (``precisions``:
        under ``inference.precision: checked``) each pass's precision and why."""
        return (f"  seconds ({name}): " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items())
                + (f"; read back from {cache_dir}: {', '.join(self.cached)}" if self.cached else "")
                + (f"\n  precision ({name}): " + "; ".join(f"{k} {how}" for k, how in self.precisions.items())
                   if precisions else ""))

    def corruption_rows(self, name: str) -> list[dict]:
        """One row per corruption (``none`` first: the clean images of the same subset), for plots."""
        return [dict(zip(CORRUPTION_COLUMNS, (name, k, m["balanced_accuracy"], m.get("roc_auc", float("nan")))))
                for k, m in self.corrupted.items()]


def run_protocol(model: keras.Model, x: np.ndarray, y: np.ndarray, cfg: config.Evaluate, seed: int,
                 threshold: float = 0.5, name: str = "model", inference_cfg: config.Inference = inference.AUTO,
                 transfer_from: np.ndarray | None = None, cache_dir: Path | None = None) -> Result:
    """``model`` judged at ``threshold`` under ``cfg``: clean, mission-attacked and diagnostic-attacked metrics, the
    weighted F1, the robust score, and the curve along ``cfg.epsilons`` (the mission's attack kind). Attacks need
    TensorFlow's gradients; every forward pass runs on the engine of ``inference_cfg``.

    The diagnostic attack (PGD: ``steps`` gradient passes an image) runs on a seeded, stratified subset of
    ``cfg.diagnostic_images`` (all images when null), and so do the figures built on it: ``diagnostic``, ``worst``
    and ``robust_score`` (both its terms, so that they count the same images). ``cfg.attacks`` run on nested
    subsets of it; ``transfer`` replays ``transfer_from`` (another model's attacked images of ``x``, in evaluate
    the undefended model's mission set, its ``Result.x_adv``) and is skipped without it. ``worst`` is per image the
    worst of every attack that ran on it. With ``cache_dir``, each pass is read back where the same pass ran before
    on the same weights and images (:mod:`pipeline.judge.cache`); the figures are computed afresh from its scores
    either way."""
    run = _Passes(model, x, y, cfg, seed, threshold, name, inference_cfg, cache_dir)
    sub = stratified_subset(y, cfg.diagnostic_images, seed)
    along = stratified_subset(y, cfg.curve_images, seed)
    # The passes, in the order they run (each computed, or read back from the cache).
    p_clean = run.clean()
    x_adv, p_adv = run.mission()
    p_diagnostic = run.diagnostic(sub)
    attacked = {a.name: run.attack(a, sub, transfer_from) for a in cfg.attacks
                if a.name != "transfer" or transfer_from is not None}  # name -> (positions in sub, P(FAKE))
    p_corrupted = run.corruptions(sub)
    p_curve = run.curve(along, p_clean, p_adv)
    # The figures, from the passes' scores.
    ys, base = y[sub], p_adv[sub]
    p_worst = metrics.worst_case(ys, base, p_diagnostic, *(_on(base, part, p) for part, p in attacked.values()))
    sets = {k: metrics.classification(labels, p, threshold) for k, labels, p in
            (("clean", y, p_clean), ("adversarial", y, p_adv), ("diagnostic", ys, p_diagnostic),
             ("worst", ys, p_worst))}
    for k, (part, p) in attacked.items():
        sets[k] = {**metrics.classification(ys[part], p, threshold), "images": len(part)}
    # White-box worst (the mission's, the diagnostic and APGD where it ran) against each gradient-free attack, on
    # the images that attack ran on.
    white = metrics.worst_case(ys, base, p_diagnostic, *(_on(base, *attacked[k]) for k in ("apgd",) if k in attacked))
    corrupted = {k: metrics.classification(ys, p, threshold) for k, p in p_corrupted.items()}
    curve = [{"model": name, "epsilon": float(eps), "f1": metrics.f1(y[along], p, threshold),
              "balanced_accuracy": metrics.measure(y[along], p, "balanced_accuracy", threshold)}
             for eps, p in p_curve.items()]
    result = Result(
        p_clean=p_clean, x_adv=x_adv, p_adv=p_adv, p_diagnostic=p_diagnostic, sets=sets, threshold=threshold,
        weighted_f1=metrics.weighted_f1(sets["clean"]["f1"], sets["adversarial"]["f1"], cfg.weights),
        robust_score=metrics.robust_score(ys, p_clean[sub], p_worst, cfg.weights, cfg.measure, threshold),
        curve=curve, diagnosed=sub, p_worst=p_worst,
        # the same images uncorrupted first, to read the others against
        corrupted={"none": metrics.classification(ys, p_clean[sub], threshold), **corrupted} if corrupted else {},
        masking={k: gradient_masking(ys[part], white[part], p, threshold, cfg.bootstrap, seed)
                 for k, (part, p) in attacked.items() if k in GRADIENT_FREE},
        seconds=run.laps.seconds, cached=run.cache.hits, precisions=run.precisions, gradients=run.cost["gradients"],
        queries=run.cost["queries"])
    run.laps("scores")
    return result


class _Passes:
    """One model's passes over the test images, each computed or read back from the cache where the same pass ran
    before on the same weights and images, with the precision its forward pass ran in, what it cost (if computed
    now) and its wall time."""

    def __init__(self, model: keras.Model, x: np.ndarray, y: np.ndarray, cfg: config.Evaluate, seed: int,
                 threshold: float, name: str, inference_cfg: config.Inference, cache_dir: Path | None):
        self.model, self.x, self.y, self.cfg, self.seed, self.threshold = model, x, y, cfg, seed, threshold
        self.name, self.inference_cfg = name, inference_cfg
        key = cache.model_key(model, x, y, seed, inference_cfg, cfg.batch_size, threshold) if cache_dir else ""
        self.cache = cache.PassCache(cache_dir, key)
        self.precisions: dict[str, str] = {}
        self.cost: dict[str, dict[str, int]] = {"gradients": {}, "queries": {}}
        self.laps = Laps()
        self.attacker = Attacker(model, cfg.attack, seed)  # the mission's attack, for its set and the curve
        self.signs: np.ndarray | None = None  # FGSM's step at every epsilon

    def __call__(self, name: str, spec: Any, compute: Callable[[], dict[str, np.ndarray]],
                 label: str | None = None) -> dict[str, np.ndarray]:
        """The pass ``name`` with settings ``spec``, its precision and, if computed now, its cost noted under
        ``label`` (default: its name)."""
        hits = len(self.cache.hits)
        out = self.cache(name, spec, compute)
        if "precision" in out:
            self.precisions[label or name] = str(out["precision"])
        for kind, counts in self.cost.items():
            if len(self.cache.hits) == hits and int(out.get(kind, 0)):
                counts[label or name] = int(out[kind])
        return out

    def bar(self, text: str | None) -> str | None:  # progress bars on a terminal only, not in logs
        return f"{self.name}: {text}" if text and sys.stderr.isatty() else None

    def scores(self, images: np.ndarray, text: str | None = None) -> dict[str, np.ndarray]:
        """P(FAKE) and the precision it was computed in (bf16 only where checked to keep the labels)."""
        p, how = inference.checked_probabilities(self.model, images, self.inference_cfg, self.threshold, self.seed,
                                                 self.cfg.batch_size, self.bar(text))
        return {"p": p, "precision": np.array(how)}

    @staticmethod
    def costed(attack: Attacker, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """``compute()``'s pass with the input gradients ``attack`` spent on it."""
        before = attack.spent
        out = compute()
        return {**out, "gradients": np.array(attack.spent - before)}

    def _mission_attacked(self, attack: config.Attack, at: np.ndarray | slice,
                          text: str | None = None) -> dict[str, np.ndarray]:
        """The mission's attack at ``attack.epsilon`` on the images ``at``, as uint8, and their scores."""
        x, y, bs = self.x[at], self.y[at], self.cfg.batch_size
        if self.signs is not None:
            adv = self.attacker.sweep(x, y, [attack.epsilon], bs, signs=self.signs[at])[attack.epsilon]
        else:
            adv = to_uint8(self.attacker.perturb(x, y, bs, attack.epsilon, progress=self.bar(text)))
        return {"x": adv, **self.scores(adv)}

    def clean(self) -> np.ndarray:
        p = self("clean", {}, lambda: self.scores(self.x, "clean"))["p"]
        self.laps("clean")
        return p

    def mission(self) -> tuple[np.ndarray, np.ndarray]:
        """Test_dataset_2: every image under the mission's attack (uint8), and its scores."""
        attack = self.cfg.attack
        if attack.name == "fgsm":
            # FGSM's direction, the sign of each image's input gradient, does not depend on epsilon: one gradient
            # pass serves the mission's set and every epsilon of the curve, and is kept apart from them, so an
            # epsilon edit costs forward passes only.
            self.signs = self("signs", [attack.name], lambda: self.costed(self.attacker, lambda: {
                "s": self.attacker.signs(self.x, self.y, self.cfg.batch_size, self.bar(attack.describe()))}))["s"]
        out = self("attack", attack.model_dump(mode="json"), lambda: self.costed(
            self.attacker, lambda: self._mission_attacked(attack, slice(None), attack.describe())))
        self.laps("attack")
        return out["x"], out["p"]

    def diagnostic(self, sub: np.ndarray) -> np.ndarray:
        # An image leaves the diagnostic once fooled at the thresholds its scores are read at (AutoAttack's rule):
        # the undefended model's images go after a few of the 20 steps. Balanced accuracy can only fall for it;
        # scores of fooled images stop near the thresholds, so the attacked ROC AUC reads higher than a full run's
        # (bench/README.md#evaluates-passes).
        cfg = self.cfg
        attacker = Attacker(self.model, cfg.diagnostic, self.seed, stop_at=(self.threshold, REFERENCE_THRESHOLD))

        def compute() -> dict[str, np.ndarray]:
            return self.scores(to_uint8(attacker.perturb(self.x[sub], self.y[sub], cfg.batch_size,
                                                         progress=self.bar(cfg.diagnostic.describe()))))

        # The threshold is part of the pass: where the attack let an image go depends on it.
        p = self("diagnostic", [cfg.diagnostic.model_dump(mode="json"), cfg.diagnostic_images, self.threshold],
                 lambda: self.costed(attacker, compute))["p"]
        self.laps("diagnostic")
        return p

    def attack(self, a: config.ExtraAttack, sub: np.ndarray,
               transfer_from: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """One of ``evaluate.attacks`` on its nested subset of ``sub``: the positions in ``sub`` and the scores."""
        part = stratified_subset(self.y[sub], a.images, self.seed)  # the first of one seeded permutation per class
        x, y = self.x[sub][part], self.y[sub][part]
        transfer = a.name == "transfer"
        source = transfer_from[sub][part] if transfer else None
        # APGD lets an image go once fooled at the model's threshold, Square's loss is the margin there; a transfer
        # attack replays its source images, whatever the threshold.
        spec = [a.model_dump(mode="json"), self.cfg.diagnostic_images, None if transfer else self.threshold,
                cache.digest(source) if transfer else None]
        p = self(a.name, spec, lambda: _scored(self.scores, _attack(
            a, self.model, x, y, self.threshold, self.seed, self.cfg.batch_size, self.bar(a.describe()), source,
            self.inference_cfg)))["p"]
        self.laps(a.name)
        return part, p

    def corruptions(self, sub: np.ndarray) -> dict[str, np.ndarray]:
        """No attacker: what a re-save, a resize, a blur or sensor noise on the way does
        (pipeline/judge/corruptions.py), on the diagnostic images."""
        out = {c.describe(): self("corruption", [c.model_dump(mode="json"), self.cfg.diagnostic_images],
                                  lambda c=c: self.scores(corruptions.apply(self.x[sub], c, self.seed)),
                                  f"corruption {c.describe()}")["p"]
               for c in self.cfg.corruptions}
        self.laps("corruptions")
        return out

    def curve(self, along: np.ndarray, p_clean: np.ndarray, p_adv: np.ndarray) -> dict[float, np.ndarray]:
        """The scores of the images ``along`` at each epsilon of the curve: 0 and the mission's own are read off
        the clean and mission passes, every other is one pass, kept on its own, so an edit to the list or to the
        mission's epsilon reads back the epsilons seen before."""
        def attacked(attack: config.Attack) -> dict[str, np.ndarray]:
            out = self.costed(self.attacker, lambda: self._mission_attacked(attack, along, "robustness curve"))
            return {k: v for k, v in out.items() if k != "x"}

        out = {}
        for eps in self.cfg.epsilons:
            if eps in (0, self.cfg.attack.epsilon):
                out[eps] = (p_clean if eps == 0 else p_adv)[along]
                continue
            attack = self.cfg.attack.model_copy(update={"epsilon": eps})
            out[eps] = self("curve", [attack.model_dump(mode="json"), self.cfg.curve_images],
                            lambda attack=attack: attacked(attack), f"curve {eps:g}")["p"]
        self.laps("curve")
        return out


class Laps:
    """Wall seconds between calls, by name (tracing included): logged to MLflow, kept out of the metrics file,
    whose figures must not change from run to run."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now


GRADIENT_FREE = ("square", "transfer")
# Beside each model's own threshold, its figures are read at this one (``Result.at_threshold``): what the stored
# threshold bought. The white-box attacks stop on an image only once it is fooled at both.
REFERENCE_THRESHOLD = 0.5


def _on(base: np.ndarray, part: np.ndarray, p: np.ndarray) -> np.ndarray:
    """``p`` (scores of the images at ``part``) spread over ``base``'s images, ``base`` elsewhere: with ``base``
    among the attacks, the worst case is unchanged where this attack did not run."""
    out = np.array(base, np.float64)
    out[part] = p
    return out


def _attack(a: config.ExtraAttack, model: keras.Model, x: np.ndarray, y: np.ndarray, threshold: float, seed: int,
            batch_size: int, progress: str | None, transferred: np.ndarray | None,
            inference_cfg: config.Inference = inference.AUTO) -> dict[str, np.ndarray]:
    """One of ``evaluate.attacks`` on ``x``: ``x`` the uint8 images (what a PNG would hold), and what they cost
    (``gradients``: images through the input gradient, APGD; ``queries``: forward queries, Square)."""
    if a.name == "transfer":
        return {"x": transferred}
    if a.name == "apgd":
        result = APGD(model, a.epsilon, a.steps, a.restarts, seed, stop_at=(threshold, REFERENCE_THRESHOLD)
                      ).run(x, y, batch_size, progress=progress)
        return {"x": to_uint8(result.x_adv), "gradients": np.array(result.queries.sum())}
    # square: its loss is the margin at the model's own threshold, so it stops once that label flips
    result = SquareAttack(square_forward(model, inference_cfg), a.epsilon, a.queries, a.p_init, threshold, seed
                          ).run(x, y, batch_size, progress=progress)
    return {"x": to_uint8(result.x_adv), "queries": np.array(result.queries.sum())}


def _scored(scores, attacked: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An attack's pass as the cache keeps it: the scores of its images and its cost, not the images."""
    return {**scores(attacked["x"]), **{k: v for k, v in attacked.items() if k != "x"}}


def square_forward(model: keras.Model, inference_cfg: config.Inference = inference.AUTO):
    """[0, 1] images -> logits, what Square queries: forward passes only, so on the inference engine (OpenVINO on
    a CPU: bench/README.md#evaluates-passes), each query's images split across the engine's requests."""
    if inference.resolve(inference_cfg) != "openvino":
        return logit_forward(model)
    run = inference.runner(logits_model(model), inference_cfg)
    return lambda x: run(x, max(1, -(-len(x) // run.requests)))[:, 0]


def gradient_masking(y: np.ndarray, p_white: np.ndarray, p_free: np.ndarray, threshold: float, resamples: int,
                     seed: int, level: float = 0.95) -> dict:
    """Does a gradient-free attack (``p_free``) beat the white-box worst case (``p_white``) on the same images?
    A defence that only hides its gradients fools every gradient attack but not these (Carlini et al. 2019).
    ``masked`` when the paired bootstrap interval of balanced accuracy (white-box minus gradient-free) lies wholly
    above 0: the gradient-free attack did better by more than the interval."""
    y = np.asarray(y).astype(bool)
    white, free = np.asarray(p_white) >= threshold, np.asarray(p_free) >= threshold
    ba = {k: metrics.measure(y, p, "balanced_accuracy", threshold) for k, p in (("white", p_white), ("free", p_free))}
    rng = np.random.default_rng(seed)
    gaps = []
    for _ in range(resamples or 1000):  # the flag needs an interval even where evaluate.bootstrap is 0
        i = rng.integers(0, len(y), len(y))
        yi = y[i]
        if yi.all() or not yi.any():
            continue
        per_class = [(w[i][yi].mean() + (~w[i][~yi]).mean()) / 2 for w in (white, free)]
        gaps.append(per_class[0] - per_class[1])
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(gaps, [tail, 100 - tail]) if gaps else (np.nan, np.nan)
    return {"white_box_balanced_accuracy": ba["white"], "balanced_accuracy": ba["free"],
            "gap": ba["white"] - ba["free"], "gap_ci95": {"low": float(low), "high": float(high)},
            "masked": bool(low > 0), "images": int(len(y))}


def rescore(name: str, version: str, x: np.ndarray, y: np.ndarray, cfg: config.Evaluate, seed: int,
            protocol_id: str, inference_cfg: config.Inference = inference.AUTO,
            transfer_from: np.ndarray | None = None, cache_dir: Path | None = None) -> registry.Standing:
    """A registered version's scores under this protocol (``protocol_id``, the id of :func:`protocol` for these
    settings), attacked white-box against itself (the transfer attack replaying ``transfer_from``, as for the
    candidate) and judged at its own stored threshold (0.5 for a version that stored none): what the champion rule
    needs when the champion's stored scores come from another protocol."""
    from pipeline.model.serving import load_with_threshold, resolve_threshold

    model, stored = load_with_threshold(f"models:/{name}/{version}")
    threshold = resolve_threshold(None, stored, 0.5)
    result = run_protocol(model, x, y, cfg, seed, threshold, f"v{version}", inference_cfg, transfer_from, cache_dir)
    return registry.Standing(str(version), result.robust_score, result.weighted_f1, protocol_id)


def log_run(final: Result, base: Result, summary: dict, cfg: config.Evaluate, protocol_id: str,
            model_ids: tuple[str | None, str | None], figures: dict, tags: dict[str, str]) -> None:
    """evaluate's MLflow run: what was judged and how (tags), each model's figures linked to the logged model they
    score (MLflow 3 lineage: ``model_ids``, the defended model's and the baseline's, whose figures ``summary`` nests
    under ``baseline``), what each pass cost, and the figures."""
    import mlflow

    results = {"advtrained": final, "baseline": base}
    mlflow.set_tags({**tags, "protocol": protocol_id, "attack": cfg.attack.describe(),
                     "diagnostic": cfg.diagnostic.describe(), **{f"attack_{a.name}": a.describe() for a in cfg.attacks},
                     "gradient_masking": str(any(m["masked"] for m in final.masking.values())),
                     **{f"cached_{name}": ", ".join(r.cached) or "none" for name, r in results.items()},
                     # inference.precision: checked decides pass by pass; the decision and its reason
                     **{f"precision.{name}.{k}": how for name, r in results.items()
                        for k, how in r.precisions.items()}})
    flat = dict(config.flatten_dict(summary, exclude=("protocol",)))
    mlflow.log_metrics({k: v for k, v in flat.items() if not k.startswith("baseline.")}, model_id=model_ids[0])
    mlflow.log_metrics({k: v for k, v in flat.items() if k.startswith("baseline.")}, model_id=model_ids[1])
    mlflow.log_metrics({f"{kind}.{name}.{k}": v for name, r in results.items()
                        for kind, values in (("seconds", r.seconds), ("gradients", r.gradients), ("queries", r.queries))
                        for k, v in values.items()})
    for name, fig in figures.items():
        mlflow.log_figure(fig, name)


def intervals(result: Result, y: np.ndarray, cfg: config.Evaluate, seed: int, threshold: float) -> dict:
    """Seeded bootstrap 95 % intervals of the headline figures (empty when ``cfg.bootstrap`` is 0); robust_score's
    over the images the diagnostic attack ran on, as the score itself."""
    if not cfg.bootstrap:
        return {}
    sub = np.arange(len(y)) if result.diagnosed is None else result.diagnosed
    p_worst = result.p_worst
    return metrics.bootstrap_ci(y, result.p_clean, result.p_adv, p_worst, cfg.weights, cfg.measure, threshold,
                                cfg.bootstrap, seed, worst_index=sub)


def protocol(cfg: config.Evaluate, x: np.ndarray, y: np.ndarray, seed: int, threshold_rule: Any,
             inference_cfg: config.Inference = inference.AUTO) -> dict:
    """Everything a score depends on besides the model: two scores compare only when their protocols match.
    ``threshold_rule`` is how each model's threshold is set (params ``threshold``), each model being judged at its
    own; ``inference_cfg`` the inference settings as set (bf16, checked or not, moves attacked labels)."""
    h = hashlib.sha256(np.ascontiguousarray(x).tobytes())
    h.update(np.asarray(y, np.uint8).tobytes())
    return {"attack": cfg.attack.model_dump(mode="json"), "diagnostic": cfg.diagnostic.model_dump(mode="json"),
            "diagnostic_images": cfg.diagnostic_images,
            **({"attacks": [a.model_dump(mode="json") for a in cfg.attacks]} if cfg.attacks else {}),
            "test_sha256": h.hexdigest()[:16], "weights": cfg.weights.model_dump(mode="json"),
            "measure": cfg.measure, "threshold": threshold_rule, "seed": seed,
            "inference": inference_cfg.model_dump(mode="json")}


def protocol_id(proto: dict) -> str:
    return hashlib.sha256(json.dumps(proto, sort_keys=True).encode()).hexdigest()[:16]


def png_names(names: list[str]) -> list[str]:
    """Each image's name in a PNG set: its own with the suffix .png, or, where two would share one (``a.jpg`` and
    ``a.png`` in one folder of a local dataset), its whole name with .png added (``a.jpg.png``, ``a.png.png``)."""
    plain = [Path(n).with_suffix(".png").as_posix() for n in names]
    count = Counter(plain)
    return [f"{n}.png" if count[p] > 1 else p for n, p in zip(names, plain)]


def write_png_set(x: np.ndarray, names: list[str], target: Path) -> None:
    """Images as lossless PNG in CIFAKE layout (``REAL/…``, ``FAKE/…``) in ``target``, a zip (or a folder), named
    by :func:`png_names`: JPEG would erase the perturbation. Replaced whole at the end, so a half-written set is
    never left."""
    with filetree.writer(target) as put:
        for img, name in zip(x, png_names(names)):
            buf = io.BytesIO()
            Image.fromarray(img, "RGB").save(buf, format="PNG", compress_level=1)
            put(name, buf.getvalue())
