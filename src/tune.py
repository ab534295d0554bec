"""Stage `tune`: an Optuna study over the head's dropout and learning rate; writes the best params.

With a frozen backbone every trial trains only the head, on backbone features computed once and cached (what a
trial costs: bench/README.md#the-heads-training-loop); with `model.trainable_from` set, every trial trains the
unfrozen model on images for `tune.epochs`.
One MLflow parent run holds the study, with a nested child run per trial.

Several processes can share the study through `tune.storage`: `tune.workers` of them on this machine (this one
starts the others), and any number more, on this or other machines, started with

    python src/tune.py --join [-S ...]      # same params, data and code; a server-backed tune.storage

which run trials until the study has `tune.n_trials` and leave. Only this process (the coordinator) writes the
best params, once all trials are finished.
"""
import sys
from pathlib import Path

# This checkout's pipeline/, whatever the environment's editable install points at (a queued `dvc exp` copy,
# a worktree, a second clone): DVC hashed this code as the stage's dependency.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import gc
import subprocess
import zlib

from pipeline import cli, tracking
from pipeline.data.splits import load_split
from pipeline.fit import features, studies, tuning
from pipeline.fit.training import Arrays
from pipeline.io import write_json
from pipeline.model.network import backbone_of, build_model

PARENT_ATTR = "mlflow_parent_run_id"


def objective(params) -> tuning.Objective:
    train, val = (load_split(params.paths.processed, n) for n in ("train", "val"))
    if not params.model.frozen:  # every trial trains the unfrozen layers on images
        return tuning.Objective(params, Arrays(train.x, train.y, val.x, val.y))
    model = build_model(params.model, dropout=0.0, seed=params.base.seed)
    data = features.for_head(model, params)
    # Trials need the backbone again only to attack validation images (robust). Otherwise free it before the
    # trials, whose copies of the features make this stage's memory peak at CIFAKE scale.
    backbone = backbone_of(model) if params.tune.objective == "robust" else None
    del model
    gc.collect()  # Keras models are reference cycles
    return tuning.Objective(params, data, backbone, val.x)


def join(params, worker: int | None) -> None:
    tracking.setup(params.mlflow)
    if worker is None:  # a worker started by hand, here or elsewhere: its own sampler seed from where it runs
        worker = 1 + zlib.crc32(studies.WORKER.encode())
    study = studies.join_study(params, features.data_key(params), worker)
    trials = objective(params)
    trials.parent_run_id = study.user_attrs.get(PARENT_ATTR)
    ran = tuning.optimize(study, trials, params.tune.n_trials, wait=False)
    print(f"tune worker: ran {ran} trials of study {study.study_name}")


def main() -> None:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("--join", action="store_true", help="add trials to the running study, then leave")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # local workers: 1, 2, ...
    args = parser.parse_args()
    params = cli.load_params(args)
    cli.seed_everything(params.base.seed)
    if args.join:
        return join(params, args.worker)
    t = params.tune

    with tracking.stage_run("tune", params) as run:
        import mlflow

        tracking.log_splits(params.paths.processed, "train", "val")
        trials = objective(params)  # fills the feature cache before any worker needs it
        study = studies.make_study(params, features.data_key(params))  # created here, once, before the workers
        study.set_user_attr(PARENT_ATTR, run.info.run_id)
        mlflow.set_tag("mlflow.runName", f"tune {study.study_name}")
        workers = [subprocess.Popen([sys.executable, __file__, "--join", "--worker", str(i), "--params", args.params,
                                     *(a for o in args.overrides for a in ("-S", o))])
                   for i in range(1, t.workers)]
        try:
            ran = tuning.optimize(study, trials, t.n_trials)
        except BaseException:  # a failed or interrupted coordinator leaves no trial processes behind
            for w in workers:
                w.terminate()
            raise
        failed = [w.args for w in workers if w.wait() != 0]
        if failed:
            cli.log.warning("tune: %d worker(s) failed; the study still has its %d trials", len(failed), t.n_trials)
        if ran == 0 and not workers:
            cli.log.warning("tune: study %s already holds %d finished trials, so none ran now; its best params are "
                            "handed on. It is keyed by params, data and code, so this is a resumed or repeated run "
                            "of the same trials. To start over: optuna delete-study --study-name %s --storage %s",
                            study.study_name, t.n_trials, study.study_name, tracking.without_password(t.storage))
        best = tuning.best(study)
        mlflow.log_params({"study": study.study_name, "best_trial": best["trial"], "trials_run_here": ran})
        mlflow.log_params({f"best_{k}": best[k] for k in ("dropout", "learning_rate")})
        mlflow.log_metrics({f"best_{t.objective}": best["value"],
                            **{f"{k}_completed_{t.objective}": v for k, v in best["completed"].items() if k != "n"}})
    # train depends on the hyperparameters alone: which study and trial found them is a metric, so a rerun of tune
    # that finds the same values (a code change, a resumed study) does not rerun train.
    write_json(params.paths.best_params, {k: best[k] for k in ("dropout", "learning_rate")})
    write_json(params.paths.metrics / "tune.json", best)
    print(f"tune: best of {t.n_trials} trials ({ran} run by this process): dropout {best['dropout']:.3f}, "
          f"learning_rate {best['learning_rate']:.2e}, {t.objective} {best['value']:.4f}; the {best['completed']['n']} "
          f"completed trials scored {best['completed']['worst']:.4f} (worst), {best['completed']['median']:.4f} "
          f"(median) (run {run.info.run_id})")


if __name__ == "__main__":
    cli.run(main)
