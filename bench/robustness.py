"""Check the pipeline's robustness figures with attacks it does not use itself.

    python bench/robustness.py                       # the models and test split of the last `dvc repro`
    python bench/robustness.py --images 500 --epsilons 8 12 16 --queries 1000
    python bench/robustness.py -S paths.model_adv=o.keras -S paths.model_adv_info=o.json   # params.yaml overrides
    python bench/robustness.py --smoke     # a small random model, a tiny sample, 8 images, 2 steps: checks it runs

For each model (after `train`, after `advtrain`), on a seeded stratified subset of the test split, judged at the
threshold stored beside it (as evaluate judges it), prints one JSON line per attack with balanced accuracy, ROC
AUC and the share called FAKE:

* ``pgd50x3-margin``: 50 steps (``--steps``) of 1/255 on the logit margin, 3 random restarts (``--restarts``), worst
  restart kept per image;
* ``pgd50-ce-step2``: 50 steps (``--steps``) of 2/255 on cross-entropy (the sigmoid's, in float32, as a plain
  implementation would do it);
* ``transfer``: the after-``train`` model's ``pgd50x3-margin`` images, replayed on the model after ``advtrain``
  (gradient masking in the defended model does not stop an attack made elsewhere);
* ``square``: the score-based black-box Square attack (Andriushchenko et al. 2020: random vertical stripes, then
  random squares of +-epsilon accepted when the margin at the stored threshold drops), ``--queries`` model calls
  an image, no gradient at all;
* ``mark``: no gradient either, the perturbation aimed at the sample's robust cue (-epsilon x the 2x2 phase mark
  towards the other class): what an attacker who knows the sample does;
* ``worst``: per image, the worst of these and of the pipeline's own two attacks.

Written independently of pipeline.judge.attacks (its own loop, losses and schedule), so a bug or a masked gradient
there does not hide here. If ``worst`` is far below the pipeline's ``diagnostic`` figure, the pipeline's PGD is
too weak.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

# bench.common imports pipeline, which sets TensorFlow's environment (oneDNN on) before TensorFlow loads: without it
# gradients on an AVX2-only CPU run many times slower (bench/README.md#onednn-and-xla).
from bench.common import SCRATCH, emit, sample_data, tiny_model  # noqa: E402


def smoke_overrides() -> list[str]:
    """What --smoke runs on: ``bench.common.tiny_model`` (saved with its threshold, as the stages save a model)
    standing in for both models, and a 16 + 8 image sample."""
    from pipeline.model import store

    _, processed, _ = sample_data(16, 8)
    path = SCRATCH / "robustness-smoke" / "model.keras"
    path.parent.mkdir(parents=True, exist_ok=True)
    store.save(tiny_model(), path)
    path.with_suffix(".json").write_text(json.dumps({"threshold": 0.5}))
    info = path.with_suffix(".json")
    return [f"paths.processed={processed}", f"paths.model={path}", f"paths.model_info={info}",
            f"paths.model_adv={path}", f"paths.model_adv_info={info}", "evaluate.diagnostic.steps=2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500, help="test images (seeded, stratified subset)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0])
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50, help="steps of the two PGD attacks")
    parser.add_argument("--queries", type=int, default=1000, help="Square attack: model calls an image")
    parser.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="params.yaml override, e.g. paths.model_adv=... (repeatable; the model's .json with it)")
    parser.add_argument("--smoke", action="store_true", help="a small random model, a tiny sample, 8 images, 2 steps")
    args = parser.parse_args()

    import tensorflow as tf
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    from pipeline import config
    from pipeline.data import sample
    from pipeline.data.splits import load_split, stratified_subset
    from pipeline.judge import metrics
    from pipeline.judge.attacks import Attacker, to_uint8
    from pipeline.model import inference, store, twin

    params = config.load(ROOT / "params.yaml", [*smoke_overrides(), *args.overrides] if args.smoke else args.overrides)
    if args.smoke:
        args.images, args.epsilons, args.restarts, args.steps, args.queries = 8, [8.0], 1, 2, 3
    test = load_split(params.paths.processed, "test")
    idx = stratified_subset(test.y, args.images, params.base.seed)
    x_u8, y = np.asarray(test.x[idx]), test.y[idx].astype(int)
    x0 = tf.constant(x_u8.astype(np.float32) / 255.0)
    sign = tf.constant((2.0 * y - 1.0).astype(np.float32)[:, None])

    made_on_baseline: dict[float, np.ndarray] = {}
    for name, path in (("baseline", params.paths.model), ("advtrained", params.paths.model_adv)):
        model = store.load(path)
        logits = twin.logits_model(model)
        threshold = json.loads(Path(path).with_suffix(".json").read_text())["threshold"]
        cut = float(np.log(threshold / (1 - threshold)))  # the logit at the stored threshold

        @tf.function
        def grad(x, kind):
            with tf.GradientTape() as tape:
                tape.watch(x)
                z = logits(x, training=False)
                if kind == "margin":
                    loss = -sign * z
                else:
                    p = tf.clip_by_value(tf.sigmoid(z), 1e-7, 1 - 1e-7)
                    t = (sign + 1) / 2
                    loss = -(t * tf.math.log(p) + (1 - t) * tf.math.log(1 - p))
            return tape.gradient(loss, x)

        def probs(x: np.ndarray) -> np.ndarray:
            return inference.predict_proba(model, x)

        def margin(x: np.ndarray) -> np.ndarray:
            """> 0 while the image is still called right at the stored threshold."""
            return (2.0 * y - 1.0) * (inference.batched(inference.forward_fn(logits), x, 256)[:, 0] - cut)

        def pgd(eps: float, steps: int, step: float, kind: str, restarts: int, seed: int) -> tuple:
            rng = np.random.default_rng(seed)
            worst, images = None, None
            for _ in range(restarts):
                x = tf.clip_by_value(x0 + rng.uniform(-eps, eps, x0.shape).astype(np.float32), 0.0, 1.0)
                for _ in range(steps):
                    x = x + step * tf.sign(grad(x, kind))
                    x = tf.clip_by_value(tf.clip_by_value(x, x0 - eps, x0 + eps), 0.0, 1.0)
                x8 = to_uint8(x.numpy())
                p = probs(x8)
                if worst is None:
                    worst, images = p, x8
                else:
                    now = metrics.worst_case(y, worst, p)
                    images = np.where((now != worst)[:, None, None, None], x8, images)
                    worst = now
            return worst, images

        def square(eps: float, queries: int, seed: int) -> np.ndarray:
            """Square attack, L-infinity, on [0, 1] images; returns the attacked images as uint8."""
            rng = np.random.default_rng(seed)
            x = x_u8.astype(np.float32) / 255.0
            n, h, w, c = x.shape
            stripes = rng.choice([-eps, eps], (n, 1, w, c)).astype(np.float32)
            best = np.clip(x + stripes, 0.0, 1.0)
            best_margin = margin(to_uint8(best))
            for i in range(queries - 1):
                active = np.flatnonzero(best_margin > 0)
                if not len(active):
                    break
                frac = 0.05 / 2 ** sum(i >= queries * k / 10_000 for k in (10, 50, 200, 500, 1000, 2000, 4000,
                                                                                6000, 8000))
                side = max(1, min(h - 1, int(round(np.sqrt(frac * h * w)))))
                trial = best[active].copy()
                for j, img in enumerate(trial):
                    r, q = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
                    img[r:r + side, q:q + side] = np.clip(
                        x[active[j], r:r + side, q:q + side] + rng.choice([-eps, eps], (1, 1, c)), 0.0, 1.0)
                z = inference.batched(inference.forward_fn(logits), to_uint8(trial), 256)[:, 0]
                new_margin = (2.0 * y[active] - 1.0) * (z - cut)
                better = new_margin < best_margin[active]
                best[active[better]] = trial[better]
                best_margin[active[better]] = new_margin[better]
            return to_uint8(best)

        def row(attack: str, eps: float, p: np.ndarray, seconds: float) -> None:
            called = p >= threshold
            emit("attack", model=name, attack=attack, epsilon_255=eps, images=len(y), threshold=round(threshold, 4),
                 balanced_accuracy=round(float(balanced_accuracy_score(y, called)), 4),
                 roc_auc=round(float(roc_auc_score(y, p)), 4), fake_share=round(float(called.mean()), 4),
                 seconds=round(seconds, 1))

        for e in args.epsilons:
            eps, found = e / 255.0, []
            own = {"fgsm": params.evaluate.attack.model_copy(update={"epsilon": e}),
                   "pipeline-" + params.evaluate.diagnostic.describe().split()[0]:
                       params.evaluate.diagnostic.model_copy(update={"epsilon": e})}
            for label, cfg in own.items():
                start = time.perf_counter()
                p = probs(to_uint8(Attacker(model, cfg, params.base.seed).perturb(x_u8, y, 256)))
                row(label, e, p, time.perf_counter() - start)
                found.append(p)
            strong = f"pgd{args.steps}x{args.restarts}-margin"
            ce = f"pgd{args.steps}-ce-step2"
            for label, kw in ((strong, dict(steps=args.steps, step=1 / 255, kind="margin", restarts=args.restarts)),
                              (ce, dict(steps=args.steps, step=2 / 255, kind="ce", restarts=1))):
                start = time.perf_counter()
                p, images = pgd(eps, seed=1, **kw)
                row(label, e, p, time.perf_counter() - start)
                found.append(p)
                if label == strong and name == "baseline":
                    made_on_baseline[e] = images
            if name == "advtrained" and e in made_on_baseline:
                p = probs(made_on_baseline[e])
                row("transfer", e, p, 0.0)
                found.append(p)
            start = time.perf_counter()
            p = probs(square(eps, args.queries, seed=2))
            row(f"square-{args.queries}", e, p, time.perf_counter() - start)
            found.append(p)
            marked = x_u8.astype(np.float64) - e * (2.0 * y - 1.0)[:, None, None, None] * sample.CHECKERBOARD
            p = probs(np.clip(np.rint(marked), 0, 255).astype(np.uint8))
            row("mark", e, p, 0.0)
            found.append(p)
            row("worst", e, metrics.worst_case(y, *found), 0.0)


if __name__ == "__main__":
    main()
