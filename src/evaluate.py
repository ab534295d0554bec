"""Stage `evaluate`: Test_dataset_1 (clean test split) and Test_dataset_2 (the same images attacked white-box with
the mission's attack against the adversarially fine-tuned model, written as PNG), a stronger diagnostic attack
(PGD), figures that count both classes with bootstrap intervals, the robustness curve, the same for the model from
before `advtrain`, and the registry's `champion` alias (moved by robust_score under one protocol)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import cli, config, evaluation, metrics, model as modellib, predicting, registry, reporting, tracking  # noqa: E402,E501
from pipeline.data import load_split  # noqa: E402
from pipeline.io import read_json, write_json  # noqa: E402


def main() -> None:
    args = cli.stage_parser(__doc__).parse_args()
    params = cli.load_params(args)
    cli.seed_everything(params.base.seed)
    cfg, paths, seed, threshold = params.evaluate, params.paths, params.base.seed, params.predict.threshold
    test = load_split(paths.processed, "test")
    info = read_json(paths.model_adv_info)
    reference = metrics.reference(test.y, cfg.weights, cfg.measure)
    protocol = evaluation.protocol(cfg, test.x, test.y, seed, threshold)
    protocol_id = evaluation.protocol_id(protocol)

    def evaluate(model, name: str) -> tuple[evaluation.Result, dict]:
        result = evaluation.evaluate(model, test.x, test.y, cfg, seed, threshold, name)
        return result, {**result.summary(reference), "ci95": evaluation.intervals(result, test.y, cfg, seed, threshold)}

    with tracking.stage_run("evaluate", params) as run:
        import mlflow

        final, final_summary = evaluate(modellib.load(paths.model_adv), "advtrained")
        base, base_summary = evaluate(modellib.load(paths.model), "baseline")
        evaluation.write_png_set(final.x_adv, test.names, paths.adversarial)
        summary = {**final_summary, "baseline": base_summary, "reference": reference,
                   "gain": {"weighted_f1": final.weighted_f1 - base.weighted_f1,
                            "robust_score": final.robust_score - base.robust_score},
                   "protocol": {**protocol, "id": protocol_id}, "n_test": len(test)}
        write_json(paths.metrics / "evaluate.json", summary)
        curve = final.curve + base.curve
        reporting.write_csv(curve, paths.plots / "robustness.csv")
        rocs = {split: metrics.roc_points(test.y, p) for split, p in (("clean", final.p_clean), ("adversarial", final.p_adv))}
        for split, p in (("clean", final.p_clean), ("adversarial", final.p_adv)):
            reporting.write_csv(evaluation.confusion_rows(test.y, p, threshold), paths.plots / f"confusion_{split}.csv")
            reporting.write_csv(rocs[split], paths.plots / f"roc_{split}.csv")

        mlflow.set_tags({"evaluated_model": info["model_uri"], "evaluated_version": info.get("version", ""),
                         "protocol": protocol_id, "attack": cfg.attack.describe(), "diagnostic": cfg.diagnostic.describe()})
        mlflow.log_metrics(dict(config.flatten_dict(summary, exclude=("protocol",))))
        mlflow.log_figure(reporting.robustness(curve), "robustness.png")
        mlflow.log_figure(reporting.roc(rocs), "roc.png")
        for split, p in (("clean", final.p_clean), ("adversarial", final.p_adv)):
            fig = reporting.confusion(test.y, (p >= threshold).astype(int), f"Test_dataset_{split}")
            mlflow.log_figure(fig, f"confusion_{split}.png")
        holds = None
        if "version" in info:
            def rescore(version: str) -> registry.Standing:
                model = predicting.load_any_model(f"models:/{info['registered_model']}/{version}")
                result = evaluation.evaluate(model, test.x, test.y, cfg, seed, threshold, f"v{version}")
                return registry.Standing(version, result.robust_score, result.weighted_f1, protocol_id)

            candidate = registry.Standing(info["version"], final.robust_score, final.weighted_f1, protocol_id)
            holds, why = registry.update_champion(info["registered_model"], candidate, reference, rescore)
            mlflow.set_tags({"champion": str(holds), "champion_reason": why})

    print(f"evaluate: weighted_f1 {final.weighted_f1:.4f}, robust_score {final.robust_score:.4f} (balanced accuracy "
          f"clean {final.clean['balanced_accuracy']:.3f}, {cfg.attack.name} {final.adversarial['balanced_accuracy']:.3f}, "
          f"{cfg.diagnostic.name} {final.sets['diagnostic']['balanced_accuracy']:.3f}); before advtrain: robust_score "
          f"{base.robust_score:.4f}, {cfg.attack.name} {base.adversarial['balanced_accuracy']:.3f}, {cfg.diagnostic.name} "
          f"{base.sets['diagnostic']['balanced_accuracy']:.3f}" + ("" if holds is None else f"; champion: {holds}"))


if __name__ == "__main__":
    cli.run(main)
