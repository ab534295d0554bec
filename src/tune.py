"""Stage `tune`: an Optuna study over the head's dropout and learning rate; writes the best params.

With a frozen backbone (the default) every trial trains only the head, on backbone features computed once and
cached. One MLflow parent run holds the study, with a nested child run per trial.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import cli, features, tracking, tuning  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402
from pipeline.io import write_json  # noqa: E402
from pipeline.model import backbone_of, build_model  # noqa: E402


def main() -> None:
    args = cli.stage_parser(__doc__).parse_args()
    params = cli.load_params(args)
    if not params.model.frozen:
        raise ConfigError("tune: model.trainable_from is set; tuning trains the head on cached features of a "
                          "frozen backbone, so set model.trainable_from: null to tune (or skip tuning)")
    cli.seed_everything(params.base.seed)
    tracking.setup(params.mlflow)

    model = build_model(params.model, dropout=0.0, seed=params.base.seed)
    head_data = features.for_head(model, params)
    val_images = None
    if params.tune.objective == "weighted_f1":
        from pipeline.data import load_split

        val_images = load_split(params.paths.processed, "val").x
    objective = tuning.Objective(params, head_data, backbone_of(model), val_images)
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
