"""Grad-CAM explanations: where the model looks when it calls an image Real or Fake.

    python src/explain.py --input IMG_OR_DIR --output DIR [--model PATH_OR_MODELS_URI] [--threshold T] [--layer NAME]

Writes one overlay PNG per image (``nested/a.jpg`` -> ``DIR/nested__a.png``) and ``DIR/explanations.csv``
(``Image Name,Predicted Label,P(FAKE)``). Images are decoded as preprocess does; unreadable files in a folder are
listed on stderr and left out.
"""
import sys
from pathlib import Path

# This checkout's pipeline/, whatever the environment's editable install points at (a queued `dvc exp` copy,
# a worktree, a second clone): DVC hashed this code as the stage's dependency.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import csv

from PIL import Image

from pipeline import cli, tracking
from pipeline.data import filetree, images
from pipeline.errors import ConfigError, DataError
from pipeline.io import atomic_path
from pipeline.model import serving
from pipeline.use import explain, predicting


def main() -> None:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("--input", type=Path, required=True, help="an image, or a folder or .zip of images")
    parser.add_argument("--output", type=Path, required=True, help="the folder to write the overlays and CSV to")
    parser.add_argument("--model", help="a .keras file or models:/NAME@ALIAS (default: paths.model_adv)")
    parser.add_argument("--threshold", type=float,
                        help="P(FAKE) at or above this is Fake (default: the model's own, chosen on validation)")
    parser.add_argument("--layer", help="the ResNet50 layer to explain (default: the deepest at least 4x4)")
    args = parser.parse_args()
    params = cli.load_params(args)
    pre = params.preprocess
    cli.check_threshold(args.threshold)
    if args.output.exists() and not args.output.is_dir():
        raise ConfigError(f"--output {args.output}: exists and is not a folder")
    # Read the input first: a wrong path is reported before the model takes seconds to load.
    if args.input.is_file() and images.is_image_name(args.input) and not filetree.is_zip(args.input):
        try:
            one = images.decode(args.input.read_bytes(), 32, pre.resize, pre.max_pixels)
        except images.BadImage as err:
            raise DataError(f"--input {args.input}: {err.reason}") from None
        parts = [predicting.FolderImages(one[None], [args.input.name], [])]
        targets = explain.output_names([args.input.name])
    else:
        listing = predicting.list_images(args.input)
        targets = explain.output_names([m.removeprefix(listing.prefix) for m in listing.members])
        parts = predicting.decode_chunks(listing, pre.resize, pre.max_pixels, chunk=512)
    if args.model and args.model.startswith(("models:/", "runs:/")):
        tracking.setup(params.mlflow)
    model, stored = serving.load_with_threshold(args.model or str(params.paths.model_adv))
    threshold = serving.resolve_threshold(args.threshold, stored, params.threshold.fixed)
    layer = explain.resolve_layer(model, args.layer)  # a wrong --layer fails before anything is written
    rows, bad = [], []
    for part in parts:
        bad.extend(part.bad)
        if not len(part.x):
            continue
        maps, p_fake = explain.gradcam_and_proba(model, part.x, layer, threshold=threshold)
        for name, image, heat, p in zip(part.names, part.x, maps, p_fake):
            with atomic_path(args.output / targets[name]) as tmp:
                Image.fromarray(explain.overlay(image, heat)).save(tmp, format="PNG")
            rows.append((name, predicting.LABELS[int(p >= threshold)], f"{p:.6g}"))
    for name, reason in bad:
        print(f"skipped {args.input / name}: {reason}", file=sys.stderr)
    with atomic_path(args.output / "explanations.csv") as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([("Image Name", "Predicted Label", "P(FAKE)"), *rows])
    fake = sum(label == "Fake" for _, label, _ in rows)
    print(f"explain: {len(rows)} images ({fake} Fake, {len(bad)} skipped), layer {layer} -> {args.output}")


if __name__ == "__main__":
    cli.run(main)
