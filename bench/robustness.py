"""Check the pipeline's robustness figures with attacks it does not use itself.

    python bench/robustness.py                       # the models and test split of the last `dvc repro`
    python bench/robustness.py --images 500 --epsilons 8 12 16

For each model (after `train`, after `advtrain`), on a seeded stratified subset of the test split, prints one JSON
line per attack with balanced accuracy, ROC AUC and the share called FAKE:

* ``pgd50x3-margin``: 50 steps of 1/255 on the logit margin, 3 random restarts, worst restart kept per image;
* ``pgd50-ce-step2``: 50 steps of 2/255 on cross-entropy (the sigmoid's, in float32, as a plain implementation
  would do it);
* ``mark``: no gradient at all, the perturbation aimed at the sample's robust cue (-epsilon x the 2x2 phase mark
  towards the other class): what an attacker who knows the sample does;
* ``worst``: per image, the worst of these and of the pipeline's own two attacks.

Written independently of pipeline.attacks (its own loop, losses and schedule), so a bug or a masked gradient
there does not hide here. If ``worst`` is far below the pipeline's ``diagnostic`` figure, the pipeline's PGD is
too weak.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def report(**fields) -> None:
    print(json.dumps(fields), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500, help="test images (seeded, stratified subset)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0])
    parser.add_argument("--restarts", type=int, default=3)
    args = parser.parse_args()

    import tensorflow as tf
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    from pipeline import config, metrics, sample
    from pipeline import model as modellib
    from pipeline.attacks import Attacker, to_uint8
    from pipeline.data import load_split, stratified_subset

    params = config.load(ROOT / "params.yaml")
    test = load_split(params.paths.processed, "test")
    idx = stratified_subset(test.y, args.images, params.base.seed)
    x_u8, y = np.asarray(test.x[idx]), test.y[idx].astype(int)
    x0 = tf.constant(x_u8.astype(np.float32) / 255.0)
    sign = tf.constant((2.0 * y - 1.0).astype(np.float32)[:, None])
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())

    for name, path in (("advtrained", params.paths.model_adv), ("baseline", params.paths.model)):
        model = modellib.load(path)
        logits = modellib.logits_model(model)

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
            return modellib.predict_proba(model, x)

        def pgd(eps: float, steps: int, step: float, kind: str, restarts: int, seed: int) -> np.ndarray:
            rng = np.random.default_rng(seed)
            worst = None
            for _ in range(restarts):
                x = tf.clip_by_value(x0 + rng.uniform(-eps, eps, x0.shape).astype(np.float32), 0.0, 1.0)
                for _ in range(steps):
                    x = x + step * tf.sign(grad(x, kind))
                    x = tf.clip_by_value(tf.clip_by_value(x, x0 - eps, x0 + eps), 0.0, 1.0)
                p = probs(to_uint8(x.numpy()))
                worst = p if worst is None else metrics.worst_case(y, worst, p)
            return worst

        def row(attack: str, eps: float, p: np.ndarray, seconds: float) -> None:
            report(model=name, attack=attack, epsilon_255=eps, images=len(y),
                   balanced_accuracy=round(float(balanced_accuracy_score(y, p >= 0.5)), 4),
                   roc_auc=round(float(roc_auc_score(y, p)), 4), fake_share=round(float((p >= 0.5).mean()), 4),
                   seconds=round(seconds, 1), cpu=cpu)

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
            for label, kw in (("pgd50x3-margin", dict(steps=50, step=1 / 255, kind="margin", restarts=args.restarts)),
                              ("pgd50-ce-step2", dict(steps=50, step=2 / 255, kind="ce", restarts=1))):
                start = time.perf_counter()
                p = pgd(eps, seed=1, **kw)
                row(label, e, p, time.perf_counter() - start)
                found.append(p)
            marked = x_u8.astype(np.float64) - e * (2.0 * y - 1.0)[:, None, None, None] * sample.CHECKERBOARD
            p = probs(np.clip(np.rint(marked), 0, 255).astype(np.uint8))
            row("mark", e, p, 0.0)
            found.append(p)
            row("worst", e, metrics.worst_case(y, *found), 0.0)


if __name__ == "__main__":
    main()
