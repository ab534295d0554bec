"""Stage `evaluate`: Test_dataset_1 (clean test split) and Test_dataset_2 (the same images attacked white-box with
the mission's attack against the adversarially trained model, written as PNG), a stronger diagnostic attack (PGD)
and ``evaluate.attacks`` (APGD-CE, Square, transfer) with a gradient-masking check, corruptions without an attacker,
figures that count both classes with bootstrap intervals, the robustness curve, the same for the model from before
`advtrain`, calibration (Brier score, reliability), Grad-CAM explanations of a few clean and attacked images, and
the registry's `champion` alias (moved by robust_score under one protocol). Each model is judged at the threshold
train or advtrain chose for it on validation."""
import gc
import sys
from pathlib import Path

# This checkout's pipeline/, whatever the environment's editable install points at (a queued `dvc exp` copy,
# a worktree, a second clone): DVC hashed this code as the stage's dependency.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import cli, tracking
from pipeline.data import bounds
from pipeline.data.splits import load_split
from pipeline.io import read_json, shared_cache, write_json
from pipeline.judge import evaluation, metrics, registry, reporting
from pipeline.model import serving
from pipeline.use import explain

EXPLAINED = 4  # test images of each class in the explanations grid


def main() -> None:
    args = cli.stage_parser(__doc__).parse_args()
    params = cli.load_params(args)
    cli.seed_everything(params.base.seed)
    cfg, paths, seed = params.evaluate, params.paths, params.base.seed
    cache_dir = shared_cache(paths.evaluate_cache)
    test = load_split(paths.processed, "test")
    info, base_info = read_json(paths.model_adv_info), read_json(paths.model_info)
    reference = metrics.reference(test.y, cfg.weights, cfg.measure)
    protocol = evaluation.protocol(cfg, test.x, test.y, seed, params.threshold.model_dump(mode="json"),
                                   params.inference)
    protocol_id = evaluation.protocol_id(protocol)

    def judged(path, name: str, transfer_from=None):
        """The model at ``path`` and its figures, judged at its own stored threshold."""
        model, stored = serving.load_with_threshold(str(path))
        threshold = serving.resolve_threshold(None, stored, params.threshold.fixed)
        return model, evaluation.run_protocol(model, test.x, test.y, cfg, seed, threshold, name, params.inference,
                                              transfer_from, cache_dir)

    with tracking.stage_run("evaluate", params):
        import mlflow

        # The undefended model first: its attacked set (its Test_dataset_2) is the transfer attack on the defended one.
        # Only its figures stay: held through the defended model's passes, the model and what was compiled and
        # converted from it raised evaluate's peak (bench/README.md#the-default-run). A Keras model is a reference
        # cycle, so it goes at the collection, not when its last name does.
        base = judged(paths.model, "baseline")[1]
        gc.collect()
        model, final = judged(paths.model_adv, "advtrained", base.x_adv)
        evaluation.write_png_set(final.x_adv, test.names, paths.adversarial)
        tracking.log_splits(paths.processed, "test")
        tracking.log_dataset(paths.adversarial, "testing-attacked", name="Test_dataset_2")
        # What the built-in sample's construction proves about any detector (pipeline/data/bounds.py): the measured
        # balanced accuracies under attack read against these. On the diagnostic images, where PGD is measured:
        # the exact bound is a flow over every conflicting FAKE/REAL pair, gigabytes over all of CIFAKE's test set.
        epsilons = [*cfg.epsilons, cfg.attack.epsilon, cfg.diagnostic.epsilon]
        on = final.diagnosed
        proven = bounds.bounds_by_epsilon(test.x[on], test.y[on], epsilons) if params.data.source == "sample" else {}
        summary = {**final.report(test.y, cfg, seed, reference), "baseline": base.report(test.y, cfg, seed, reference),
                   "reference": reference, **({"sample_bounds": proven} if proven else {}),
                   "gain": {"weighted_f1": final.weighted_f1 - base.weighted_f1,
                            "robust_score": final.robust_score - base.robust_score},
                   "protocol": {**protocol, "id": protocol_id}, "n_test": len(test)}
        write_json(paths.metrics / "evaluate.json", summary)
        figures = reporting.evaluation_plots(test.y, {"clean": final.p_clean, "adversarial": final.p_adv},
                                             final.curve + base.curve, final.threshold, paths.plots, proven)
        by_model = {name: r.corruption_rows(name) for name, r in (("advtrained", final), ("baseline", base))}
        for name, rows in by_model.items():  # declared outputs: a header alone when evaluate.corruptions is empty
            reporting.write_csv(rows, paths.plots / f"corruptions_{name}.csv", evaluation.CORRUPTION_COLUMNS)
        if cfg.corruptions:
            figures["corruptions.png"] = reporting.corruptions([r for rows in by_model.values() for r in rows])
        figures["explanations.png"] = explanations = explain.figure_for(
            model, test.x, final.x_adv, test.y, final.threshold, EXPLAINED)
        reporting.save_figure(explanations, paths.plots / "explanations.png")
        evaluation.log_run(final, base, summary, cfg, protocol_id, (info.get("model_id"), base_info.get("model_id")),
                           figures, {"evaluated_model": info["model_uri"],
                                     "evaluated_version": info.get("version", "")})
        champion = ""
        if "version" in info:
            candidate = registry.Standing(info["version"], final.robust_score, final.weighted_f1, protocol_id)
            holds, why = registry.update_champion(
                info["registered_model"], candidate, reference,
                lambda v: evaluation.rescore(info["registered_model"], v, test.x, test.y, cfg, seed, protocol_id,
                                             params.inference, base.x_adv, cache_dir))
            mlflow.set_tags({"champion": str(holds), "champion_reason": why})
            champion = f"; v{info['version']} {'is' if holds else 'is not'} @champion ({why})"

    print(f"evaluate: {final.line(cfg)}\n  before advtrain: {base.line(cfg)}{champion}")
    for name, r in (("advtrained", final), ("baseline", base)):
        print(r.costs(name, cache_dir, params.inference.precision == "checked"))


if __name__ == "__main__":
    cli.run(main)
