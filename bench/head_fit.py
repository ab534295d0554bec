"""What one tuning trial costs at CIFAKE size: ``training.HeadTrainer`` (one for all fits, as tune shares one among
its trials) on 80,000 x 2,048 cached features, against the arithmetic it needs, measured in the same run.

    python bench/head_fit.py                 # 80,000 train / 20,000 val random features, 3 fits x 4 epochs
    python bench/head_fit.py --n 8000        # the default sample's size

The features are random (cost does not depend on their values). Per fit, one JSON line: seconds per epoch (the
first epoch apart: in the first fit it traces the compiled loop), the process's peak RSS so far, and the **floor**:
the epoch's matrix FLOPs (forward 2·(2048·256 + 256·64 + 64) per image; backward twice that, the weight gradients
and the input gradients of all three layers, the first one's for the batch norm before it) over
``tf.linalg.matmul``'s rate on 4096² float32 measured at the start of the run, and over its rate on the head's own
first-layer shape (batch x 2048 @ 2048 x 256), which small GEMMs reach less well. The non-matrix work (batch norm,
dropout, Adam on 545k weights, the gathers) is not in the floor.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import emit, loadavg  # noqa: E402


def matmul_gflops(m: int, k: int, n: int, repeats: int = 7) -> float:
    import tensorflow as tf

    a, b = tf.random.normal((m, k)), tf.random.normal((k, n))
    fn = tf.function(lambda a, b: tf.linalg.matmul(a, b))
    reps = max(1, int(2e10 // (2 * m * k * n)))  # ~20 GFLOP a timing
    for _ in range(2):
        fn(a, b).numpy()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(reps):
            c = fn(a, b)
        c.numpy()
        times.append((time.perf_counter() - t0) / reps)
    return 2 * m * k * n / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=80_000, help="train features (val: a quarter of it)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--fits", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None, help="default: tune.batch_size")
    args = parser.parse_args()

    import numpy as np

    from pipeline import config, training

    params = config.load(ROOT / "params.yaml")
    batch = args.batch or params.tune.batch_size
    load = loadavg()
    big = matmul_gflops(4096, 4096, 4096)
    small = matmul_gflops(batch, 2048, 256)
    emit("matmul", load, gflops_4096=round(big, 1), gflops_head_shape=round(small, 1), head_shape=[batch, 2048, 256])

    rng = np.random.default_rng(0)
    n, nv = args.n, args.n // 4
    data = training.Arrays(rng.standard_normal((n, 2048), dtype=np.float32), (rng.random(n) < 0.5).astype(np.uint8),
                           rng.standard_normal((nv, 2048), dtype=np.float32), (rng.random(nv) < 0.5).astype(np.uint8))
    forward = 2 * (2048 * 256 + 256 * 64 + 64)
    # Weight gradients of all three layers, and input gradients of all three too: the first layer's is what the
    # batch norm before it (trainable gamma and beta) learns from.
    backward = 2 * forward
    flop_epoch = n * (forward + backward) + nv * forward  # + the validation pass

    import keras

    trainer = training.HeadTrainer(data, params.model.l2, batch)  # as tune shares one among its trials
    for fit in range(args.fits):

        marks = []

        class Clock(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                marks.append(time.perf_counter())

        load = loadavg()
        t0 = time.perf_counter()
        trainer.fit(0.3, 1e-3, args.epochs, [Clock()], seed=fit)
        epochs_s = [b - a for a, b in zip([t0, *marks], marks)]
        steady = statistics.median(epochs_s[1:]) if len(epochs_s) > 1 else epochs_s[0]
        emit("head_fit", load, fit=fit, n_train=n, n_val=nv, batch_size=batch, first_epoch_s=round(epochs_s[0], 3),
             seconds_per_epoch=round(steady, 3), gflop_per_epoch=round(flop_epoch / 1e9, 1),
             floor_s_at_4096_rate=round(flop_epoch / (big * 1e9), 3),
             floor_s_at_head_shape_rate=round(flop_epoch / (small * 1e9), 3),
             times_floor_4096=round(steady / (flop_epoch / (big * 1e9)), 2),
             times_floor_head_shape=round(steady / (flop_epoch / (small * 1e9)), 2),
             peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
             features_mib=round((data.x_train.nbytes + data.x_val.nbytes) / 2**20))


if __name__ == "__main__":
    main()
