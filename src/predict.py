"""Stage `predict` and the user's tool for any folder of images.

As a DVC stage (no arguments): writes Test_1_results.csv (clean test set) and Test_2_results.csv (the adversarial
test set written by `evaluate`) with the adversarially fine-tuned model. For any folder:

    python src/predict.py --input DIR --output FILE.csv [--model PATH_OR_MODELS_URI] [--threshold T]

Any size or mode is handled as preprocess does; unreadable files are listed on stderr and left out of the CSV.
"""
import sys
from pathlib import Path

# This checkout's pipeline/, whatever the environment's editable install points at (a queued `dvc exp` copy,
# a worktree, a second clone): DVC hashed this code as the stage's dependency.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from pipeline import cli, tracking
from pipeline.errors import ConfigError
from pipeline.model import serving
from pipeline.model.inference import checked_probabilities
from pipeline.use import predicting


def main() -> None:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("--input", type=Path, help="a folder or .zip of images (searched recursively)")
    parser.add_argument("--output", type=Path, help="the CSV to write (with --input)")
    parser.add_argument("--model", help="a .keras file or models:/NAME@ALIAS (default: paths.model_adv)")
    parser.add_argument("--threshold", type=float,
                        help="P(FAKE) at or above this is Fake (default: the model's own, chosen on validation)")
    args = parser.parse_args()
    if (args.input is None) != (args.output is None):
        raise ConfigError("--input and --output go together")
    params = cli.load_params(args)
    cli.check_threshold(args.threshold)
    out = params.paths.predictions
    # (where, the part of it to read, the CSV): Test_dataset_1 is the test half of the raw dataset
    jobs = ([(args.input, "", args.output)] if args.input is not None else
            [(params.paths.raw, "test", out / "Test_1_results.csv"),
             (params.paths.adversarial, "", out / "Test_2_results.csv")])
    # List the images first: a wrong or empty folder is reported before the model takes seconds to load.
    listings = [predicting.list_images(folder, under) for folder, under, _ in jobs]
    if args.model and args.model.startswith(("models:/", "runs:/")):
        tracking.setup(params.mlflow)
    model, stored = serving.load_with_threshold(args.model or str(params.paths.model_adv))
    threshold = serving.resolve_threshold(args.threshold, stored, params.threshold.fixed)
    def p_fake(x):
        p, how = checked_probabilities(model, x, params.inference, threshold, params.base.seed,
                                       params.predict.batch_size)
        if params.inference.precision == "checked":
            print(f"predict: {len(x)} images in {how}")
        return p

    for listing, (_, _, output) in zip(listings, jobs):
        done = predicting.predict_to_csv(p_fake, listing, params.preprocess.resize, params.preprocess.max_pixels,
                                         threshold, output)
        for name, reason in done.skipped:
            print(f"skipped {listing.folder / listing.prefix / name}: {reason}", file=sys.stderr)
        print(f"predict: {done.images} images -> {output} ({done.fake} Fake, {len(done.skipped)} skipped)")


if __name__ == "__main__":
    cli.run(main)
