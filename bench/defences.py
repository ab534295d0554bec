"""Compare adversarial-training defences through the pipeline's own advtrain, from the same trained model.

    python bench/defences.py                     # after `dvc repro train`: default params, 2 epochs each
    python bench/defences.py --epochs 3 --only fgsm pgd3

Each defence fine-tunes a fresh copy of ``models/model.keras`` with ``training.adversarial_finetune`` (the epoch
with the best validation robust_score under the defence's own attack is kept, as the stage does), then the test
split is scored clean, under the mission's FGSM and under the evaluate stage's PGD diagnostic. One JSON line per
defence, with seconds per epoch and the CPU. FGSM training is known to overfit to FGSM (Wong et al. 2020); PGD
training (Madry et al. 2018) is the standard remedy: this is the measurement behind the default.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFENCES = {
    "fgsm": {"name": "fgsm", "epsilon": 8},
    # FGSM from a random start with a 1.25 x epsilon step: Wong et al.'s "fast adversarial training".
    "fgsm-rs": {"name": "pgd", "epsilon": 8, "steps": 1, "step_size": 10, "random_start": True},
    "pgd3": {"name": "pgd", "epsilon": 8, "steps": 3, "step_size": 4, "random_start": True},
    "pgd7": {"name": "pgd", "epsilon": 8, "steps": 7, "step_size": 2, "random_start": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=list(DEFENCES), default=list(DEFENCES))
    args = parser.parse_args()

    from pipeline import config, metrics, training
    from pipeline import model as modellib
    from pipeline.attacks import Attacker, to_uint8
    from pipeline.data import load_split

    params = config.load(ROOT / "params.yaml")
    seed, ev = params.base.seed, params.evaluate
    train, val, test = (load_split(params.paths.processed, n) for n in ("train", "val", "test"))
    data = training.Arrays(train.x, train.y, val.x, val.y)
    cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))

    for name in args.only:
        cfg = params.advtrain.model_copy(update={"attack": config.Attack(**DEFENCES[name]), "epochs": args.epochs})
        model = modellib.load(params.paths.model)
        modellib.set_trainable(modellib.backbone_of(model), cfg.trainable_from)
        attacker = Attacker(model, cfg.attack, seed)
        before = training.validation_scores(model, attacker, val.x, val.y, cfg.batch_size, ev)
        start = time.perf_counter()
        history, best, _ = training.adversarial_finetune(model, data, cfg, ev, seed, before=before, attacker=attacker)
        seconds = time.perf_counter() - start
        scores = {}
        for label, attack in (("clean", None), ("fgsm", ev.attack), ("pgd", ev.diagnostic)):
            x = test.x if attack is None else to_uint8(Attacker(model, attack, seed).perturb(test.x, test.y, 256))
            scores[label] = metrics.classification(test.y, modellib.predict_proba(model, x))
        print(json.dumps({
            "defence": name, "attack": cfg.attack.describe(), "epochs": args.epochs, "kept_epoch": best,
            "seconds_per_epoch": round(seconds / max(args.epochs, 1), 1),
            "val_robust_score_per_epoch": [round(r["val_robust_score"], 4) for r in history],
            **{f"test_{k}_balanced_accuracy": round(v["balanced_accuracy"], 4) for k, v in scores.items()},
            "test_pgd_roc_auc": round(scores["pgd"]["roc_auc"], 4), "n_train": len(train), "n_test": len(test),
            "cpu": cpu,
        }), flush=True)


if __name__ == "__main__":
    main()
