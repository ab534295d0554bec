"""Benchmark the preprocess stage on a CIFAKE-sized raw tree: images/s and peak memory.

    python bench/preprocess.py            # 100k train + 20k test 32×32 JPEGs (generated once, ~1 min)
    python bench/preprocess.py --small    # 1.6k + 0.4k, a few seconds

Each preprocess run happens in a fresh subprocess so its peak RSS is its own (not the generator's). Prints one
JSON line per figure. The raw tree is kept under bench/out/ (git-ignored) and reused.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import PIL  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline import config, data  # noqa: E402


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }


def make_raw(raw: Path, train_per_class: int, test_per_class: int, seed: int = 0) -> None:
    """CIFAKE layout, 32×32 JPEGs (quality 95): a random colour gradient plus noise, different for every file."""
    marker = raw / f".complete-{train_per_class}-{test_per_class}"
    if marker.exists():
        return
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, 32)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for cls in data.CLASSES:
            folder = raw / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = rng.integers(0, 256, 3)
                slope = rng.integers(-128, 128, 3)
                img = base + ramp[None, :, None] * slope + rng.normal(0, 12 if cls == "REAL" else 20, (32, 32, 3))
                name = f"{i // 10:04d} ({i % 10 + 1}).jpg"  # CIFAKE-like names, unique per folder
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / name, quality=95)
    marker.touch()


def cpu_seconds() -> float:
    """User + system CPU of this process and its reaped children: less disturbed by other load than wall time."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(raw: Path, out: Path, workers: int) -> dict:
    """Run in a fresh process: one preprocess, its time and peak RSS (own, and the largest worker's)."""
    cfg = config.Preprocess(val_fraction=0.2, resize="resize", max_bad_fraction=0.01, max_pixels=16777216,
                              duplicates="report", duplicate_similarity=0.99)
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    report = data.preprocess(raw, out, cfg, seed=42, progress=False, workers=workers)  # workers are reaped inside
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    x_bytes = sum((out / s / "x.npy").stat().st_size for s in data.SPLITS)
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "cpu_seconds": cpu,
        "seconds": seconds,
        "images": report["images"],
        "files": report["files"],
        "x_bytes": x_bytes,
        "maxrss_main_kib": own.ru_maxrss,
        "maxrss_worker_kib": kids.ru_maxrss,  # the largest single child, not a sum
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="2k images instead of 120k")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="decode processes to compare")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--measure", nargs=3, metavar=("RAW", "OUT", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        raw, out, workers = args.measure
        print(json.dumps(measure(Path(raw), Path(out), int(workers))))
        return

    train_pc, test_pc = (800, 200) if args.small else (50_000, 10_000)
    raw = args.out / f"raw-{2 * (train_pc + test_pc)}"
    t0 = time.perf_counter()
    make_raw(raw, train_pc, test_pc)
    gen_s = time.perf_counter() - t0
    common = {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "command": "python bench/preprocess.py" + (" --small" if args.small else ""),
    }
    print(json.dumps({"figure": "raw tree ready", "value": round(gen_s, 1), "unit": "s", **common}))
    for workers in args.workers:
        cmd = [sys.executable, __file__, "--measure", str(raw), str(args.out / "processed"), str(workers)]
        load_before = os.getloadavg()[0]  # other work on the machine slows the wall-time figures
        m = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        run = {"workers": workers, "files": m["files"], "loadavg_1m_before": load_before, **common}
        figures = [
            ("preprocess throughput", round(m["files"] / m["seconds"]), "files/s"),
            ("preprocess wall time", round(m["seconds"], 2), "s"),
            ("files per CPU-second (main + workers)", round(m["files"] / m["cpu_seconds"]), "files/s"),
            ("peak RSS, main process", round(m["maxrss_main_kib"] / 1024, 1), "MiB"),
            ("peak RSS, largest worker", round(m["maxrss_worker_kib"] / 1024, 1) if workers > 1 else 0, "MiB"),
            ("output x.npy, all splits", round(m["x_bytes"] / 2**20, 1), "MiB"),
        ]
        for figure, value, unit in figures:
            print(json.dumps({"figure": figure, "value": value, "unit": unit, **run}), flush=True)


if __name__ == "__main__":
    main()
