"""Is ``model.precision: mixed_bfloat16`` worth offering? Its speed and the F1 it gives, next to float32.

    python bench/precision.py            # on data/processed (run `dvc repro preprocess` first)

For each precision, the same recipe the frozen-backbone stages follow: build the model (seeded, so both use the
same random or loaded backbone weights), extract train/val/test features through ``pipeline.features.extract``,
fit the head with the tuned hyperparameters (``models/best_params.json`` if present) for ``train.epochs`` with
early stopping, put it back on the backbone, then score the test split clean and under the ``evaluate.attack``
(attacked in the same precision). One JSON line per precision, then the differences; the issue's bar is an F1
within 0.005 of float32.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import emit, loadavg  # noqa: E402


def run(precision: str, params, hp: dict) -> dict:
    import keras

    from pipeline import features, metrics, model, training
    from pipeline.attacks import Attacker, to_uint8
    from pipeline.data import load_split

    cfg = params.model.model_copy(update={"precision": precision})
    built = model.build_model(cfg, hp["dropout"], params.base.seed)
    splits = {n: load_split(params.paths.processed, n) for n in ("train", "val", "test")}
    t0 = time.perf_counter()
    feats = {n: features.extract(built, s.x, cfg.batch_size) for n, s in splits.items()}
    extract_s = time.perf_counter() - t0
    n_images = sum(len(s.x) for s in splits.values())
    keras.utils.set_random_seed(params.base.seed)
    data = training.Arrays(feats["train"], splits["train"].y, feats["val"], splits["val"].y)
    head, _ = training.fit_head(data, hp["dropout"], hp["learning_rate"], cfg.l2, params.train.epochs,
                                params.train.batch_size, callbacks=[training.early_stopping(params.train.patience)])
    full = model.assemble(model.backbone_of(built), head, cfg.image_size)
    test = splits["test"]
    p_clean = model.predict_proba(full, test.x, cfg.batch_size)
    t0 = time.perf_counter()
    x_adv = to_uint8(Attacker(full, params.evaluate.attack, params.base.seed).perturb(test.x, test.y, cfg.batch_size))
    attack_s = time.perf_counter() - t0
    p_adv = model.predict_proba(full, x_adv, cfg.batch_size)
    s = metrics.scores(test.y, p_clean, p_adv, params.evaluate)
    return {"precision": precision, **{f"test_{k}": round(v, 4) for k, v in s.items()},
            "val_f1": round(metrics.f1(splits["val"].y, model.predict_proba(full, splits["val"].x)), 4),
            "extract_images_per_s": round(n_images / extract_s), "attack_images_per_s": round(len(test.x) / attack_s)}


def main() -> None:
    from pipeline import config, model

    params = config.load(ROOT / "params.yaml", ["model.trainable_from=null"])
    best = ROOT / params.paths.best_params
    hp = json.loads(best.read_text()) if best.exists() else {"dropout": 0.3, "learning_rate": 1e-3}
    rows = {}
    for precision in ("float32", "mixed_bfloat16"):
        load = loadavg()
        rows[precision] = run(precision, params, hp)
        model.set_precision("float32")
        emit("precision", load, **rows[precision], hyperparameters={k: hp[k] for k in ("dropout", "learning_rate")})
    f32, bf16 = rows["float32"], rows["mixed_bfloat16"]
    emit("precision_difference", None, test_f1_delta=round(bf16["test_f1"] - f32["test_f1"], 4),
         test_adv_f1_delta=round(bf16["test_adv_f1"] - f32["test_adv_f1"], 4),
         extract_speedup=round(bf16["extract_images_per_s"] / f32["extract_images_per_s"], 2),
         attack_speedup=round(bf16["attack_images_per_s"] / f32["attack_images_per_s"], 2),
         within_0_005=abs(bf16["test_f1"] - f32["test_f1"]) <= 0.005)


if __name__ == "__main__":
    main()
