"""Time the built-in sample generator: seconds and peak memory.

    python bench/sample.py                      # default size from params.yaml
    python bench/sample.py --cifake             # 50k+50k train, 10k+10k test
    python bench/sample.py --smoke              # 16 + 8 images a class: checks the script runs

The sample's proven bounds are evaluate's (``sample_bounds`` in metrics/evaluate.json); the single-cue classifier
baselines in bench/README.md#samplepy were a one-off study (git history keeps its code).
The sample is written under bench/out/ (git-ignored).
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

from bench.common import OUT, emit  # noqa: E402
from pipeline import config  # noqa: E402
from pipeline.data import sample  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifake", action="store_true", help="CIFAKE size: 50k+50k train, 10k+10k test")
    parser.add_argument("--seed", type=int, default=None, help="default: base.seed from params.yaml")
    parser.add_argument("--smoke", action="store_true", help="16 + 8 images a class (seconds)")
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


if __name__ == "__main__":
    main()
