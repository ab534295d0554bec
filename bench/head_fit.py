"""What one tuning trial costs at CIFAKE size: ``training.fit_head`` on 80,000 x 2,048 cached features.

    python bench/head_fit.py                 # 80,000 train / 20,000 val random features, 3 trials x 3 epochs
    python bench/head_fit.py --n 8000        # the default sample's size

The features are random (cost does not depend on their values). One JSON line per trial: seconds per epoch and the
process's peak RSS so far, next to the size of the features themselves, so Keras's own copies show. Explains the
full-scale tune stage's time and memory (see bench/README.md).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import emit, loadavg  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=80_000, help="train features (val: a quarter of it)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()

    import numpy as np

    from pipeline import config, training

    params = config.load(ROOT / "params.yaml")
    rng = np.random.default_rng(0)
    n, nv = args.n, args.n // 4
    data = training.Arrays(rng.standard_normal((n, 2048), dtype=np.float32), (rng.random(n) < 0.5).astype(np.uint8),
                           rng.standard_normal((nv, 2048), dtype=np.float32), (rng.random(nv) < 0.5).astype(np.uint8))
    features_mib = (data.x_train.nbytes + data.x_val.nbytes) / 2**20
    for trial in range(args.trials):
        load = loadavg()
        t0 = time.perf_counter()
        training.fit_head(data, 0.3, 1e-3, params.model.l2, args.epochs, params.tune.batch_size)
        seconds = (time.perf_counter() - t0) / args.epochs
        emit("head_fit", load, trial=trial, n_train=n, n_val=nv, batch_size=params.tune.batch_size,
             seconds_per_epoch=round(seconds, 2), features_mib=round(features_mib),
             peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


if __name__ == "__main__":
    main()
