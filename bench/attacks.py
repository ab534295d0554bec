"""Attack throughput and the evaluate stage's core.

    python bench/attacks.py            # FGSM/PGD on 2,048 images; evaluate() on the 20,000-image sample test set
    python bench/attacks.py --small    # 512 images for both

Figures (one JSON line each), on ``pipeline.model.build_model`` (ResNet50, weights none, frozen, 32×32, float32):
- ``attack``: ``pipeline.attacks.Attacker(model, attack, seed).perturb(x, y, 256)`` images/s for FGSM (epsilon 8)
  and PGD (10 steps of 2/255, random start, epsilon 8); the Attacker is warmed up on one batch first (tracing
  excluded). Each FGSM image costs one forward and one input-gradient pass, each PGD image ten of them.
- ``evaluate``: ``pipeline.evaluation.evaluate(model, x, y, params.evaluate, seed)`` wall time with the evaluate
  params from params.yaml (FGSM at evaluate.attack.epsilon plus the robustness curve over evaluate.epsilons), on
  the built-in sample's test split (``pipeline.sample.write_sample`` with test_per_class 10,000, preprocessed),
  tracing included; ``attacked_images``/``forward_images`` count the image passes (the curve runs on
  ``evaluate.curve_images`` images where that is set) (that is what the stage pays, and the stage calls it twice:
  advtrained and baseline model).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import emit, loadavg, sample_data, timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="512 images")
    parser.add_argument("--skip-evaluate", action="store_true")
    args = parser.parse_args()
    n_attack = 512 if args.small else 2048
    batch = 256
    raw, processed, made_s = sample_data(100 if args.small else 2000, 256 if args.small else 10_000)

    from pipeline import config, evaluation
    from pipeline.attacks import Attacker
    from pipeline.data import load_split
    from pipeline.model import build_model

    params = config.load(ROOT / "params.yaml")
    cfg = params.model.model_copy(update={"trainable_from": None, "weights": "none", "image_size": 32,
                                          "precision": "float32"})
    model = build_model(cfg, 0.0, seed=42)
    test = load_split(processed, "test", mmap=False)
    x, y = test.x, test.y
    xa, ya = x[:n_attack], y[:n_attack]

    attacks = {
        "fgsm": config.Attack(name="fgsm", epsilon=8),
        "pgd": config.Attack(name="pgd", epsilon=8, steps=10, step_size=2, random_start=True),
    }
    for name, attack in attacks.items():
        attacker = Attacker(model, attack, seed=42)
        warm_s, _ = timed(lambda: attacker.perturb(xa[:batch], ya[:batch], batch))
        load = loadavg()
        secs, adv = timed(lambda: attacker.perturb(xa, ya, batch))
        passes = 1 if name == "fgsm" else attack.steps
        emit("attack", load, attack=name, epsilon=attack.epsilon, steps=passes, images=len(xa), batch_size=batch,
             seconds=round(secs, 2), images_per_s=round(len(xa) / secs, 1),
             gradient_passes_per_s=round(passes * len(xa) / secs, 1), first_batch_s=round(warm_s, 2),
             max_abs_change=round(float(abs(adv - xa / 255.0).max() * 255), 3),
             path="pipeline.attacks.Attacker.perturb")

    if args.skip_evaluate:
        return
    ev = params.evaluate
    load = loadavg()
    secs, result = timed(lambda: evaluation.evaluate(model, x, y, ev, params.base.seed))
    extra_eps = [e for e in ev.epsilons if e not in (0, ev.attack.epsilon)]
    curve_n = min(getattr(ev, "curve_images", None) or len(x), len(x))  # robustness curve on a subset, if set
    emit("evaluate", load, images=len(x), seconds=round(secs, 1), images_per_s=round(len(x) / secs, 1),
         attack=ev.attack.name, epsilon=ev.attack.epsilon, epsilons=ev.epsilons, batch_size=ev.batch_size,
         curve_images=curve_n, attacked_images=len(x) + len(extra_eps) * curve_n,
         forward_images=2 * len(x) + len(extra_eps) * curve_n,
         data=f"built-in sample test split (write_sample test_per_class={len(x) // 2}, preprocessed)",
         sample_made_s=round(made_s, 1), weighted_f1=round(result.weighted_f1, 4),
         path="pipeline.evaluation.evaluate (tracing included)")


if __name__ == "__main__":
    main()
