"""Stage `evaluate`: Test_dataset_1 (clean test split) and Test_dataset_2 (the same images attacked white-box
against the adversarially fine-tuned model, written as PNG), metrics and the weighted score, the robustness
curve, the same for the model from before `advtrain`, and the registry's `champion` alias."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import cli, config, evaluation, metrics, model as modellib, reporting, tracking  # noqa: E402
from pipeline.data import load_split  # noqa: E402
from pipeline.io import read_json, write_json  # noqa: E402


def main() -> None:
    args = cli.stage_parser(__doc__).parse_args()
    params = cli.load_params(args)
    cli.seed_everything(params.base.seed)
    cfg, paths, threshold = params.evaluate, params.paths, params.predict.threshold
    tracking.setup(params.mlflow)
    test = load_split(paths.processed, "test")

    final = evaluation.evaluate(modellib.load(paths.model_adv), test.x, test.y, cfg, params.base.seed,
                                threshold, "advtrained")
    base = evaluation.evaluate(modellib.load(paths.model), test.x, test.y, cfg, params.base.seed,
                               threshold, "baseline")
    evaluation.write_png_set(final.x_adv, test.names, paths.adversarial)

    summary = {**final.summary(), "baseline": base.summary(),
               "gain": {"weighted_f1": final.weighted_f1 - base.weighted_f1,
                        "adversarial_f1": final.adversarial["f1"] - base.adversarial["f1"]},
               "reference": metrics.constant_fake(test.y, cfg.weights),
               "attack": cfg.attack.model_dump(), "n_test": len(test)}
    write_json(paths.metrics / "evaluate.json", summary)
    plots = paths.plots
    reporting.write_csv(final.curve + base.curve, plots / "robustness.csv")
    rocs = {split: metrics.roc_points(test.y, p) for split, p in (("clean", final.p_clean), ("adversarial", final.p_adv))}
    for split, p in (("clean", final.p_clean), ("adversarial", final.p_adv)):
        reporting.write_csv(evaluation.confusion_rows(test.y, p, threshold), plots / f"confusion_{split}.csv")
        reporting.write_csv(rocs[split], plots / f"roc_{split}.csv")

    info = read_json(paths.model_adv_info)
    with tracking.stage_run("evaluate", params):
        import mlflow

        mlflow.set_tags({"evaluated_model": info["model_uri"], "evaluated_version": info.get("version", "")})
        mlflow.log_metrics(dict(config.flatten_dict(summary, exclude=("attack",))))
        mlflow.log_figure(reporting.robustness(final.curve + base.curve), "robustness.png")
        mlflow.log_figure(reporting.roc(rocs), "roc.png")
        for split, p in (("clean", final.p_clean), ("adversarial", final.p_adv)):
            fig = reporting.confusion(test.y, (p >= threshold).astype(int), f"Test_dataset_{split}")
            mlflow.log_figure(fig, f"confusion_{split}.png")
        if "version" in info:
            name = info["registered_model"]
            tracking.set_version_tags(name, info["version"], {
                "weighted_f1": final.weighted_f1, "clean_f1": final.clean["f1"],
                "adversarial_f1": final.adversarial["f1"], "attack": f"{cfg.attack.name}@{cfg.attack.epsilon:g}/255"})
            tracking.promote_if_better(name, info["version"], final.weighted_f1)

    print(f"evaluate: weighted_f1 {final.weighted_f1:.4f} (clean F1 {final.clean['f1']:.4f}, adversarial F1 "
          f"{final.adversarial['f1']:.4f}); before advtrain {base.weighted_f1:.4f} (adversarial F1 "
          f"{base.adversarial['f1']:.4f})")


if __name__ == "__main__":
    cli.run(main)
