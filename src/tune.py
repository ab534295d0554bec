"""Stage `tune`: an Optuna study over the head's dropout and learning rate; writes the best params.

With a frozen backbone every trial trains only the head, on backbone features computed once and cached (seconds
a trial); with `model.trainable_from` set, every trial trains the unfrozen model on images for `tune.epochs`.
One MLflow parent run holds the study, with a nested child run per trial.
"""
import gc

from pipeline import cli, features, tracking, tuning
from pipeline.data import load_split
from pipeline.io import write_json
from pipeline.model import backbone_of, build_model
from pipeline.training import Arrays


def main() -> None:
    args = cli.stage_parser(__doc__).parse_args()
    params = cli.load_params(args)
    cli.seed_everything(params.base.seed)
    t = params.tune

    with tracking.stage_run("tune", params) as run:
        import mlflow

        train, val = (load_split(params.paths.processed, n) for n in ("train", "val"))
        if params.model.frozen:
            model = build_model(params.model, dropout=0.0, seed=params.base.seed)
            data = features.for_head(model, params)
            # Trials need the backbone again only to attack validation images (robust). Otherwise free it before
            # the trials, whose copies of the features make this stage's memory peak at CIFAKE scale.
            backbone = backbone_of(model) if t.objective == "robust" else None
            del model
            gc.collect()  # Keras models are reference cycles
            objective = tuning.Objective(params, data, backbone, val.x)
        else:  # every trial trains the unfrozen layers on images
            objective = tuning.Objective(params, Arrays(train.x, train.y, val.x, val.y))
        study = tuning.make_study(params, features.data_key(params))
        mlflow.set_tag("mlflow.runName", f"tune {study.study_name}")
        ran = tuning.optimize(study, objective, t.n_trials)
        if ran == 0:
            cli.log.warning("tune: study %s already holds %d finished trials, so none ran now; its best params are "
                            "handed on. It is keyed by params, data and code, so this is a resumed or repeated run "
                            "of the same trials; delete %s to start over.", study.study_name, t.n_trials, t.storage)
        best = tuning.best(study)
        mlflow.log_params({"study": study.study_name, "best_trial": best["trial"], "trials_run_now": ran})
        mlflow.log_params({f"best_{k}": best[k] for k in ("dropout", "learning_rate")})
        mlflow.log_metric(f"best_{t.objective}", best["value"])
    write_json(params.paths.best_params, best)
    print(f"tune: best of {t.n_trials} trials (ran {ran} now): dropout {best['dropout']:.3f}, learning_rate "
          f"{best['learning_rate']:.2e}, {t.objective} {best['value']:.4f} (run {run.info.run_id})")


if __name__ == "__main__":
    cli.run(main)
