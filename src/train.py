"""Stage `train`: fit the classifier with the tuned dropout and learning rate; save, log and register it.

With a frozen backbone (the default) only the head trains, on the cached backbone features, and is then put on
the backbone; otherwise the unfrozen part of the backbone trains with it, on images.
"""

import sys
from pathlib import Path

# This checkout's pipeline/, whatever the environment's editable install points at (a queued `dvc exp` copy,
# a worktree, a second clone): DVC hashed this code as the stage's dependency.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import cli, tracking
from pipeline.data.splits import load_split
from pipeline.fit import features, training
from pipeline.io import read_json, write_json
from pipeline.judge import metrics, reporting
from pipeline.model import inference, network, serving, store


def main() -> None:
    args = cli.stage_parser(__doc__).parse_args()
    params = cli.load_params(args)
    cli.seed_everything(params.base.seed)
    hp = read_json(params.paths.best_params)
    t, m = params.train, params.model

    with tracking.stage_run("train", params) as run:
        tracking.log_params({"dropout": hp["dropout"], "learning_rate": hp["learning_rate"]})
        tracking.log_splits(params.paths.processed, "train", "val")
        model = network.build_model(m, hp["dropout"], params.base.seed)
        callbacks = [training.early_stopping(t.patience), training.MlflowEpochLogger()]
        val = load_split(params.paths.processed, "val")
        if m.frozen:
            data = features.for_head(model, params)
            head, history = training.fit_head(data, hp["dropout"], hp["learning_rate"], m.l2, t.epochs, t.batch_size,
                                              callbacks, verbose=2, seed=params.base.seed)
            model = network.assemble(network.backbone_of(model), head, m.image_size)
            p_val = inference.predict_proba(network.head_classifier(head), data.x_val, 4096)  # the cached features
        else:
            train = load_split(params.paths.processed, "train")
            data = training.Arrays(train.x, train.y, val.x, val.y)
            history = training.fit_model(model, data, hp["learning_rate"], t.epochs, t.batch_size,
                                         params.base.seed, callbacks, verbose=2)
            p_val = inference.predict_proba(model, val.x, m.batch_size)
        threshold = training.choose_threshold(params.threshold, params.evaluate, val.y, p_val)
        scores = metrics.classification(val.y, p_val, threshold)
        summary = {"epochs_run": len(history["loss"]), "threshold": threshold,
                   **{f"val_{k}": v for k, v in scores.items()}}
        import mlflow

        mlflow.log_metrics(summary)
        mlflow.log_figure(reporting.training_curves(history), "training_curves.png")
        store.save(model, params.paths.model)
        write_json(params.paths.model_info, {"threshold": threshold})  # the pair agrees even if logging fails
        settings = serving.settings(threshold, params.preprocess)
        info = serving.log_version(params.paths.model, settings, "model", params.mlflow.model_name, val.x[0])

    write_json(params.paths.model_info, {**info, "threshold": threshold})
    write_json(params.paths.metrics / "train.json", summary)
    reporting.write_history_csv(history, params.paths.plots / "train_history.csv")
    print(f"train: val F1 {scores['f1']:.4f} at threshold {threshold:.4g} after {summary['epochs_run']} epochs; "
          f"saved {params.paths.model}, registered {info.get('registered_model')} v{info.get('version')} "
          f"(run {run.info.run_id})")


if __name__ == "__main__":
    cli.run(main)
