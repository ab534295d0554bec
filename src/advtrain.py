"""Stage `advtrain`: adversarial training of the trained model (advtrain.method: PGD by default, N-FGSM or TRADES)
on examples generated on the fly against the current weights; keeps the epoch with the best validation
robust_score; saves, logs and registers the result."""
import sys
from pathlib import Path

# This checkout's pipeline/, whatever the environment's editable install points at (a queued `dvc exp` copy,
# a worktree, a second clone): DVC hashed this code as the stage's dependency.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import cli, tracking
from pipeline.data.splits import load_split, stratified_subset
from pipeline.fit import training
from pipeline.io import write_json
from pipeline.judge import reporting
from pipeline.model import network, serving, store


def main() -> None:
    args = cli.stage_parser(__doc__).parse_args()
    params = cli.load_params(args)
    cli.seed_everything(params.base.seed)
    cfg, m = params.advtrain, params.evaluate.measure

    with tracking.stage_run("advtrain", params) as run:
        import mlflow

        model = store.load(params.paths.model)
        network.set_trainable(network.backbone_of(model), cfg.trainable_from)
        train, val = (load_split(params.paths.processed, n) for n in ("train", "val"))
        tracking.log_splits(params.paths.processed, "train", "val")
        pick = stratified_subset(val.y, cfg.val_images, params.base.seed)
        rows, kept, p_val = training.adversarial_finetune(
            model, training.Arrays(train.x, train.y, val.x[pick], val.y[pick]), cfg, params.evaluate,
            params.base.seed, on_epoch_end=lambda epoch, row: mlflow.log_metrics(row, step=epoch))
        before, after = rows[0], rows[kept]
        summary = {**{f"before_{k}": v for k, v in before.items() if k != "loss"}, **after, "epochs": cfg.epochs,
                   "best_epoch": kept, "val_images": len(pick)}
        if params.threshold.rule == "criterion":  # chosen under the strongest attack evaluate judges by
            p_val = training.probabilities_under_diagnostic(model, params.evaluate, val.x[pick], val.y[pick],
                                                            params.base.seed, cfg.batch_size)
            summary.update(training.diagnostic_scores(val.y[pick], p_val, params.evaluate))
        summary["threshold"] = training.choose_threshold(params.threshold, params.evaluate, val.y[pick], *p_val)
        mlflow.log_metrics({k: v for k, v in summary.items() if v is not None})
        store.save(model, params.paths.model_adv)
        write_json(params.paths.model_adv_info, {"threshold": summary["threshold"]})  # agrees even if logging fails
        # the deliverable's usual name, in Keras's HDF5 format, with its threshold inside
        store.save(model, params.paths.model_h5, threshold=summary["threshold"])
        settings = serving.settings(summary["threshold"], params.preprocess)
        info = serving.log_version(params.paths.model_adv, settings, "model", params.mlflow.model_name,
                                   val.x[0])

    write_json(params.paths.model_adv_info, {**info, "threshold": summary["threshold"]})
    write_json(params.paths.metrics / "advtrain.json", summary)
    reporting.write_csv([{"epoch": i, **{k: "" if v is None else v for k, v in r.items()}} for i, r in enumerate(rows)],
                        params.paths.plots / "advtrain_history.csv")
    print(f"advtrain ({cfg.method}): kept epoch {kept} of {cfg.epochs}; validation robust_score "
          f"{before['val_robust_score']:.4f} -> "
          f"{after['val_robust_score']:.4f} ({m} under {cfg.attack.describe()} {before[f'val_adv_{m}']:.4f} -> "
          f"{after[f'val_adv_{m}']:.4f}, clean {before[f'val_{m}']:.4f} -> {after[f'val_{m}']:.4f}); threshold "
          f"{summary['threshold']:.4g}; registered v{info.get('version')} (run {run.info.run_id})")


if __name__ == "__main__":
    cli.run(main)
