"""Stage `tune`: an Optuna study over the head's dropout and learning rate; writes the best params.

With a frozen backbone every trial trains only the head, on backbone features computed once and cached (seconds
a trial); with `model.trainable_from` set, every trial trains the unfrozen model on images for `tune.epochs`.
One MLflow parent run holds the study, with a nested child run per trial.
"""
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import cli, features, tracking, tuning  # noqa: E402
from pipeline.data import load_split  # noqa: E402
from pipeline.io import write_json  # noqa: E402
from pipeline.model import backbone_of, build_model  # noqa: E402
from pipeline.training import Arrays  # noqa: E402


def main() -> None:
    args = cli.stage_parser(__doc__).parse_args()
    params = cli.load_params(args)
    cli.seed_everything(params.base.seed)
    tracking.setup(params.mlflow)

    train, val = (load_split(params.paths.processed, n) for n in ("train", "val"))
    if params.model.frozen:
        model = build_model(params.model, dropout=0.0, seed=params.base.seed)
        data = features.for_head(model, params)
        # Trials need the backbone again only to attack validation images (robust). Otherwise free it before
        # the trials, whose copies of the features make this stage's memory peak at CIFAKE scale.
        backbone = backbone_of(model) if params.tune.objective == "robust" else None
        del model
        gc.collect()  # Keras models are reference cycles
        objective = tuning.Objective(params, data, backbone, val.x)
    else:  # every trial trains the unfrozen layers on images
        objective = tuning.Objective(params, Arrays(train.x, train.y, val.x, val.y))
    study = tuning.make_study(params, features.data_key(params))

    with tracking.stage_run("tune", params, run_name=f"tune {study.study_name}"):
        ran = tuning.optimize(study, objective, params.tune.n_trials)
        best = tuning.best(study)
        import mlflow

        mlflow.log_params({"study": study.study_name, "best_trial": best["trial"], "trials_run_now": ran})
        mlflow.log_params({f"best_{k}": best[k] for k in ("dropout", "learning_rate")})
        mlflow.log_metric(f"best_{params.tune.objective}", best["value"])
    write_json(params.paths.best_params, best)
    print(f"tune: best of {params.tune.n_trials} trials (ran {ran} now): dropout {best['dropout']:.3f}, "
          f"learning_rate {best['learning_rate']:.2e}, {params.tune.objective} {best['value']:.4f}")


if __name__ == "__main__":
    cli.run(main)
