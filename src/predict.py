"""Stage `predict` and the user's tool for any folder of images.

As a DVC stage (no arguments): writes Test_1_results.csv (clean test set) and Test_2_results.csv (the adversarial
test set written by `evaluate`) with the adversarially fine-tuned model. For any folder:

    python src/predict.py --input DIR --output FILE.csv [--model PATH_OR_MODELS_URI] [--threshold T]

Any size or mode is handled as preprocess does; unreadable files are listed on stderr and left out of the CSV.
"""
import sys
from pathlib import Path

from pipeline import cli, predicting, tracking
from pipeline.errors import ConfigError
from pipeline.model import predict_proba


def predict_folder(model, found: predicting.FolderImages, folder: Path, output: Path, params, threshold: float) -> None:
    for name, reason in found.bad:
        print(f"skipped {folder / name}: {reason}", file=sys.stderr)
    p_fake = predict_proba(model, found.x, params.predict.batch_size)
    predicting.write_csv(found.names, predicting.labels(p_fake, threshold), output)
    print(f"predict: {len(found.names)} images -> {output} ({int((p_fake >= threshold).sum())} Fake, "
          f"{len(found.bad)} skipped)")


def main() -> None:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("--input", type=Path, help="a folder or .zip of images (searched recursively)")
    parser.add_argument("--output", type=Path, help="the CSV to write (with --input)")
    parser.add_argument("--model", help="a .keras file or models:/NAME@ALIAS (default: paths.model_adv)")
    parser.add_argument("--threshold", type=float, help="P(FAKE) at or above this is Fake (default: predict.threshold)")
    args = parser.parse_args()
    if (args.input is None) != (args.output is None):
        raise ConfigError("--input and --output go together")
    params = cli.load_params(args)
    threshold = params.predict.threshold if args.threshold is None else args.threshold
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"--threshold must lie in (0, 1) (got {threshold})")
    out = params.paths.predictions
    # (where, the part of it to read, the CSV): Test_dataset_1 is the test half of the raw dataset
    jobs = ([(args.input, "", args.output)] if args.input is not None else
            [(params.paths.raw, "test", out / "Test_1_results.csv"),
             (params.paths.adversarial, "", out / "Test_2_results.csv")])
    # Read the images first: a wrong or empty folder is reported before the model takes seconds to load.
    found = [predicting.read_folder(folder, params.preprocess.resize, params.preprocess.max_pixels, under)
             for folder, under, _ in jobs]
    if args.model and args.model.startswith(("models:/", "runs:/")):
        tracking.setup(params.mlflow)
    model = predicting.load_any_model(args.model or str(params.paths.model_adv))
    for (folder, under, output), images in zip(jobs, found):
        predict_folder(model, images, folder / under, output, params, threshold)


if __name__ == "__main__":
    cli.run(main)
