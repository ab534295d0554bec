"""Near-duplicate detection (pipeline.data.duplicates) on the built-in sample: recall on planted copies, false matches.

    python bench/duplicates.py [--processed data/processed] [--planted 1000]
    python bench/duplicates.py --smoke      # a 16 + 8 image sample, 8 planted: checks the script runs

Plants copies of seeded train images (exact, JPEG-re-saved at 90/75/50, mirrored, mirrored and re-saved, brighter)
and counts how many `duplicates.find` finds against train at `preprocess.duplicate_similarity`; then how many test
images match train at all (the sample's train and test crops come from disjoint photographs: any match is false).
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import emit, loadavg, sample_data  # noqa: E402
from pipeline import config  # noqa: E402
from pipeline.data import duplicates  # noqa: E402
from pipeline.data.splits import load_split  # noqa: E402


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processed", type=Path, default=ROOT / "data" / "processed")
    parser.add_argument("--planted", type=int, default=1000)
    parser.add_argument("--smoke", action="store_true", help="a 16 + 8 image sample, 8 planted")
    args = parser.parse_args()
    if args.smoke:
        args.processed, args.planted = sample_data(16, 8)[1], 8
    threshold = config.load(ROOT / "params.yaml").preprocess.duplicate_similarity
    train, val, test = (load_split(args.processed, s, mmap=False) for s in ("train", "val", "test"))
    pick = np.random.default_rng(0).choice(len(train), args.planted, replace=False)
    src = train.x[pick]
    planted = {"exact": src, "jpeg90": [jpeg(x, 90) for x in src], "jpeg75": [jpeg(x, 75) for x in src],
               "jpeg50": [jpeg(x, 50) for x in src], "mirrored": src[:, :, ::-1],
               "mirrored_jpeg75": [jpeg(x[:, ::-1], 75) for x in src],
               "brighter12": np.clip(src.astype(int) + 12, 0, 255).astype(np.uint8)}
    recall = {}
    for kind, x in planted.items():
        m = duplicates.find(np.asarray(x), train.x, threshold)
        recall[kind] = round(float(np.mean(m.reference == pick[m.query])) * len(m.query) / len(pick), 4)
    start = time.perf_counter()
    false = {"test_in_train": len(duplicates.find(test.x, train.x, threshold).query),
             "test_in_val": len(duplicates.find(test.x, val.x, threshold).query)}
    seconds = time.perf_counter() - start
    emit("duplicates", loadavg(), threshold=threshold, planted=len(pick), recall=recall, false_matches=false,
         test_images=len(test), seconds_test_vs_train_and_val=round(seconds, 2),
         val_in_train=len(duplicates.find(val.x, train.x, threshold).query))


if __name__ == "__main__":
    main()
