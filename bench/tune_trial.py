"""Seconds per tuning trial: a head on cached backbone features versus retraining the whole model on images.

    python bench/tune_trial.py            # built-in sample, 2,000 + 2,000 train images (3,200 train / 800 val)
    python bench/tune_trial.py --small    # 100 + 100 (160 / 40), a few seconds plus two traces

Both trials are ``pipeline.tuning.Objective.__call__`` on ``optuna.trial.FixedTrial({"dropout": 0.3,
"learning_rate": 1e-3})`` inside an MLflow parent run on a fresh SQLite store under the scratch folder, with
``tune.objective: f1`` and ``tune.epochs: 2`` (other tune.* values from params.yaml):

- cached: ``model.trainable_from: null``; the features come from ``pipeline.features.for_head`` (timed
  separately, cache emptied first: the one-time cost), then each trial trains a fresh head on them;
- full retrain: ``model.trainable_from: conv1_conv``; the trial builds the model and fits it on the images.

Prints the per-trial seconds, the ratio, and the ratio with the one-time extraction amortised over 20 trials.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import SCRATCH, emit, loadavg, sample_data, timed  # noqa: E402

FIXED = {"dropout": 0.3, "learning_rate": 1e-3}
AMORTISE_OVER = 20


def load_params(processed: Path, work: Path, trainable_from: str | None, epochs: int):
    from pipeline import config

    default = config.load(ROOT / "params.yaml")
    overrides = [f"paths.{k}={work / v}" for k, v in default.paths.model_dump().items()]
    overrides += [
        f"paths.processed={processed}",
        f"paths.features_cache={work / 'features'}",
        f"tune.storage=sqlite:///{work}/optuna/study.db",
        f"mlflow.tracking_uri=sqlite:///{work}/mlruns/mlflow.db",
        "mlflow.experiment=bench-tune-trial",
        f"model.trainable_from={'null' if trainable_from is None else trainable_from}",
        "tune.objective=f1",
        f"tune.epochs={epochs}",
    ]
    return config.load(ROOT / "params.yaml", overrides)


def run_trials(objective, n: int) -> tuple[list[float], list[float]]:
    """Seconds and value of ``n`` runs of ``objective`` on the same fixed trial."""
    import optuna

    times, values = [], []
    for _ in range(n):
        seconds, value = timed(lambda: objective(optuna.trial.FixedTrial(FIXED)))
        times.append(seconds)
        values.append(value)
    return times, values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="100 + 100 train images")
    parser.add_argument("--cached-trials", type=int, default=3, help="cached-feature trials to time (median)")
    parser.add_argument("--full-trials", type=int, default=1, help="full-retrain trials to time (median)")
    parser.add_argument("--epochs", type=int, default=2, help="tune.epochs for both kinds of trial")
    args = parser.parse_args()
    per_class = 100 if args.small else 2000
    raw, processed, made_s = sample_data(per_class, 256 if args.small else 10_000)

    import mlflow

    import optuna
    from pipeline import features, tracking, tuning
    from pipeline.data import load_split
    from pipeline.model import backbone_of, build_model
    from pipeline.training import Arrays

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    work = SCRATCH / f"tune-trial-{per_class}"
    shutil.rmtree(work, ignore_errors=True)
    frozen = load_params(processed, work, None, args.epochs)
    full = load_params(processed, work, "conv1_conv", args.epochs)
    train, val = load_split(processed, "train"), load_split(processed, "val")
    sizes = {"train_images": len(train), "val_images": len(val), "epochs": args.epochs,
             "tune_batch_size": frozen.tune.batch_size, "objective": "f1", "fixed_trial": FIXED,
             "sample_made_s": round(made_s, 1)}
    tracking.setup(frozen.mlflow)  # creates the SQLite store (seconds) before anything is timed

    with mlflow.start_run(run_name="bench tune_trial"):
        # One-time cost of the cached mode: build the frozen model and extract train + val features.
        load = loadavg()
        extract_s, (model, arrays) = timed(lambda: (lambda m: (m, features.for_head(m, frozen)))(
            build_model(frozen.model, 0.0, frozen.base.seed)))
        hit_s, _ = timed(lambda: features.for_head(model, frozen))
        n_feat = len(train) + len(val)
        emit("tune_feature_extraction_once", load, seconds=round(extract_s, 2), cache_hit_s=round(hit_s, 3),
             images=n_feat, images_per_s=round(n_feat / extract_s, 1), **sizes,
             path="build_model + features.for_head (train + val, cache emptied first)")

        load = loadavg()
        cached, values = run_trials(tuning.Objective(frozen, arrays, backbone_of(model), val.x), args.cached_trials)
        cached_s = statistics.median(cached)
        emit("tune_trial_cached", load, seconds=round(cached_s, 3), all_s=[round(s, 3) for s in cached],
             val_f1=[round(v, 4) for v in values], **sizes, path="tuning.Objective, model.trainable_from null")

        load = loadavg()
        full_times, values = run_trials(tuning.Objective(full, Arrays(train.x, train.y, val.x, val.y)),
                                        args.full_trials)
        full_s = statistics.median(full_times)
        emit("tune_trial_full_retrain", load, seconds=round(full_s, 2), all_s=[round(s, 2) for s in full_times],
             val_f1=[round(v, 4) for v in values], **sizes,
             path="tuning.Objective, model.trainable_from conv1_conv")

    amortised = cached_s + extract_s / AMORTISE_OVER
    emit("tune_trial_ratio", None, full_retrain_s=round(full_s, 2), cached_s=round(cached_s, 3),
         ratio=round(full_s / cached_s, 1), extraction_once_s=round(extract_s, 2),
         cached_amortised_s=round(amortised, 3), ratio_amortised_over_20=round(full_s / amortised, 1),
         target_ratio=20, meets_target=full_s / cached_s >= 20, meets_target_amortised=full_s / amortised >= 20,
         **sizes)


if __name__ == "__main__":
    main()
