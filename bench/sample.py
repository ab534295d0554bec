"""Time the built-in sample generator and measure how separable its REAL and FAKE images are.

    python bench/sample.py                      # default size from params.yaml: time + peak memory
    python bench/sample.py --cifake             # 50k+50k train, 10k+10k test
    python bench/sample.py --measure [--resnet] # also the bounds and single-cue baselines
    python bench/sample.py --smoke              # 16 + 8 images a class, with --measure: checks the script runs

Accuracies are on the test split (photographs the train split never saw). Prints one JSON line per figure. The
sample is written under bench/out/ (git-ignored).
"""
from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import OUT, emit  # noqa: E402
from pipeline import config, sample  # noqa: E402


def read(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All images of one split as uint8 (n, 32, 32, 3) and labels (1 = FAKE)."""
    xs, ys = [], []
    for label, cls in enumerate(sample.CLASSES):
        for path in sorted((root / split / cls).iterdir()):
            with Image.open(path) as im:
                xs.append(np.asarray(im.convert("RGB")))
            ys.append(label)
    return np.stack(xs), np.array(ys)


def laplacian_energy(x: np.ndarray) -> np.ndarray:
    return sample.fingerprint_features(x)[:, :1]


def mean_std(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return np.concatenate([x.mean((1, 2)), x.std((1, 2))], axis=1)


def measure(root: Path, resnet: bool, seed: int) -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (xtr, ytr), (xte, yte) = read(root, "train"), read(root, "test")

    def logreg(c: float = 1.0):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))

    def score(name: str, feats, model) -> None:
        acc = model.fit(feats(xtr), ytr).score(feats(xte), yte)
        emit("classifier", classifier=name, test_accuracy=round(float(acc), 3), n_train=len(ytr), n_test=len(yte))

    for eps in (0, 2, 4, 6, 8, 10, 12, 16):
        bounds = sample.robustness_bounds(xte, yte, eps)
        emit("bounds", classifier="reference: sign of the 2x2 phase mark (sample.mark_score)", epsilon_255=eps,
             certified_test_accuracy=round(sample.certified_accuracy(xte, yte, eps), 4),
             certified_balanced_accuracy_lower_bound=round(bounds["lower"], 4),
             balanced_accuracy_ceiling=round(bounds["upper"], 4), n_test=len(yte))
    emit("classifier", classifier="the sign of the line pattern (the non-robust cue, sample.lines_score), clean",
         n_test=len(yte), test_accuracy=round(float(((sample.lines_score(xte) > 0) == yte).mean()), 4))
    score("logreg: RGB mean+std", mean_std, logreg())
    score("gradient boosting: RGB mean+std", mean_std, HistGradientBoostingClassifier(random_state=0))
    score("logreg: Laplacian energy", laplacian_energy, logreg())
    score("logreg: mean+std+Laplacian", lambda x: np.concatenate([mean_std(x), laplacian_energy(x)], 1), logreg())
    score("logreg: raw pixels", lambda x: x.reshape(len(x), -1) / 255.0, logreg(0.01))
    score("logreg: 5 fingerprint features", sample.fingerprint_features, logreg())
    score("gradient boosting: 5 fingerprint features", sample.fingerprint_features,
          HistGradientBoostingClassifier(random_state=0))
    if resnet:  # the pipeline's own frozen backbone (params.yaml's model): what tune and train fit heads on
        from pipeline import features
        from pipeline.model import build_model

        built = build_model(config.load(ROOT / "params.yaml").model, 0.0, seed)
        score("logreg: the pipeline's frozen ResNet50 features", lambda x: features.extract(built, x, 256), logreg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifake", action="store_true", help="CIFAKE size: 50k+50k train, 10k+10k test")
    parser.add_argument("--seed", type=int, default=None, help="default: base.seed from params.yaml")
    parser.add_argument("--measure", action="store_true", help="baseline and classifier accuracies")
    parser.add_argument("--resnet", action="store_true", help="with --measure: the pipeline's backbone's features")
    parser.add_argument("--smoke", action="store_true", help="16 + 8 images a class, --measure (seconds)")
    args = parser.parse_args()
    params = config.load(ROOT / "params.yaml")
    cfg = params.sample
    if args.cifake or args.smoke:
        sizes = (16, 8) if args.smoke else (50_000, 10_000)
        cfg = cfg.model_copy(update=dict(zip(("train_per_class", "test_per_class"), sizes)))
    seed = params.base.seed if args.seed is None else args.seed
    out = OUT / "sample"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    counts = sample.write_sample(out, cfg, seed, progress=False)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    emit("generate", images=sum(counts.values()), seconds=round(seconds, 1),
         images_per_s=round(sum(counts.values()) / seconds), peak_rss_mib=round(peak_mib), seed=seed)
    if args.measure or args.smoke:
        measure(out, args.resnet, seed)


if __name__ == "__main__":
    main()
