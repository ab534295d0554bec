"""Stage `advtrain`: adversarial training of the trained model on a mix of clean and adversarial examples (PGD by
default), generated on the fly against the current weights; keeps the epoch with the best validation robust_score;
saves, logs and registers the result."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import cli, model as modellib, reporting, tracking, training  # noqa: E402
from pipeline.attacks import Attacker  # noqa: E402
from pipeline.data import load_split  # noqa: E402
from pipeline.io import write_json  # noqa: E402


def main() -> None:
    args = cli.stage_parser(__doc__).parse_args()
    params = cli.load_params(args)
    cli.seed_everything(params.base.seed)
    cfg, seed = params.advtrain, params.base.seed
    tracking.setup(params.mlflow)

    model = modellib.load(params.paths.model)
    modellib.set_trainable(modellib.backbone_of(model), cfg.trainable_from)
    train, val = (load_split(params.paths.processed, n) for n in ("train", "val"))
    data = training.Arrays(train.x, train.y, val.x, val.y)

    with tracking.stage_run("advtrain", params) as run:
        import mlflow

        attacker = Attacker(model, cfg.attack, seed)
        before = training.validation_scores(model, attacker, val.x, val.y, cfg.batch_size, params.evaluate)
        mlflow.log_metrics({f"before_{k}": v for k, v in before.items()})
        history, best_epoch = training.adversarial_finetune(
            model, data, cfg, params.evaluate, seed, before,
            on_epoch_end=lambda epoch, row: mlflow.log_metrics(row, step=epoch), attacker=attacker,
        )
        after = history[best_epoch - 1] if best_epoch else {"loss": None, **before}
        summary = {**{f"before_{k}": v for k, v in before.items()}, **after, "epochs": cfg.epochs,
                   "best_epoch": best_epoch}
        mlflow.log_metrics({k: v for k, v in after.items() if k != "loss"} | {"best_epoch": best_epoch})
        modellib.save(model, params.paths.model_adv)
        info = tracking.log_keras_model(model, modellib.to_unit(val.x[:8]), "model", params.mlflow.model_name)

    write_json(params.paths.model_adv_info, info)
    write_json(params.paths.metrics / "advtrain.json", summary)
    rows = [{"epoch": 0, "loss": None, **before}] + [{"epoch": i + 1, **r} for i, r in enumerate(history)]
    reporting.write_csv([{k: ("" if v is None else v) for k, v in r.items()} for r in rows],
                        params.paths.plots / "advtrain_history.csv")
    m = params.evaluate.measure
    print(f"advtrain: kept epoch {best_epoch} of {cfg.epochs}; validation robust_score {before['val_robust_score']:.4f} "
          f"-> {after['val_robust_score']:.4f} ({m} under {cfg.attack.describe()} {before[f'val_adv_{m}']:.4f} -> "
          f"{after[f'val_adv_{m}']:.4f}, clean {before[f'val_{m}']:.4f} -> {after[f'val_{m}']:.4f}); registered "
          f"v{info.get('version')} (run {run.info.run_id})")


if __name__ == "__main__":
    cli.run(main)
