"""Scoring on Spark against the predict tool (#21): images a second at 20,000 images, and the start-up cost.

    python bench/spark.py [--n 20000] [--master local[2]]   # the built-in sample's test split: 32×32 JPEGs
    python bench/spark.py --tools predict                   # the predict tool alone (target: >= 1,000 images/s)
    python bench/spark.py --smoke      # both tools once, on 16 images, bench.common.tiny_model: checks it runs

Both tools score the same folder with the same registered version (a ResNet50, weights none, frozen, 32×32: the real
model's compute, logged as the pipeline logs one in a scratch MLflow store), as subprocesses from the repository
root: ``src/predict.py --input DIR --output F.csv --model models:/cifake-bench@champion``, and ``src/score_spark.py``
with the same arguments and ``--master``. Figures (JSON lines): ``<tool>_startup``, the tool on 16 of the images
(imports, JVM, model load); ``<tool>_full``, on all N; ``<tool>_marginal``, (N - 16) / (full - startup), the rate
once started. ``cpu_s``: CPU seconds of the tool's whole process tree (driver, JVM, Spark's Python workers), which
other load inflates far less than wall time; ``peak_rss_mib``: the largest resident size any one process of the tree
reached (sampled every 0.2 s); ``rss_streaming`` (the full run): whether memory stays put while the images
stream through, per kind of process (the tool or Spark's largest Python worker, the JVM, the tree's total): RSS
from half to 90 % of the run's time, its start, end, max and least-squares slope in MiB/min (:func:`flatness`;
the series in bench/out/logs/spark-<tool>-full-rss.json). The two
CSVs must give every image the same label (checked).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import OUT, SCRATCH, emit, loadavg, sample_data, slope_mib_per_min, stage_env, tiny_model  # noqa: E402

NAME = "cifake-bench"


def images(n: int) -> tuple[Path, Path]:
    """The sample's test split with n/2 images a class (``bench.common.sample_data``, made once), and 16 of them in
    a folder of their own."""
    folder = sample_data(16, n // 2)[0] / "test"
    shutil.rmtree(tiny := SCRATCH / f"spark-tiny-{n}", ignore_errors=True)
    for cls in ("REAL", "FAKE"):
        (tiny / cls).mkdir(parents=True)
        for p in sorted((folder / cls).glob("*.jpg"))[:8]:
            shutil.copy(p, tiny / cls / p.name)
    return folder, tiny


def register(folder: Path, smoke: bool) -> str:
    """A fresh scratch store in ``folder`` holding the benchmark model (with ``smoke``,
    ``bench.common.tiny_model``) as version 1
    @champion; returns its tracking URI."""
    import mlflow

    from pipeline import config
    from pipeline.model import network, serving, store

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    mlflow.set_tracking_uri(uri := f"sqlite:///{folder}/mlflow.db")
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("bench", (folder / "artifacts").as_uri()))
    params, keras_file = config.load(ROOT / "params.yaml"), OUT / "spark-model.keras"
    cfg = params.model.model_copy(update={"trainable_from": None, "weights": "none", "image_size": 32})
    store.save(tiny_model() if smoke else network.build_model(cfg, 0.0, seed=42), keras_file)
    with mlflow.start_run():
        info = serving.log_version(keras_file, serving.settings(0.5, params.preprocess), "model", NAME)
    mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", info["version"])
    return uri


def run(cmd: list[str], env: dict, log: Path) -> tuple[float, float, float, list[tuple[float, dict[str, float]]]]:
    """Wall and CPU seconds of ``cmd``'s process tree, its largest process's peak RSS in MiB, from /proc every
    0.2 s (``time`` misses Spark's JVM), and once a second the RSS in MiB of each kind of process in the tree (the
    largest ``python`` one: the tool, or a Spark worker; ``java``, Spark's JVM; ``total``, the tree's sum)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    ticks: dict[tuple[int, str], int] = {}
    rss_pages = 0
    series: list[tuple[float, dict[str, float]]] = []
    page_mib = os.sysconf("SC_PAGE_SIZE") / 2**20
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            stats = {}
            for d in Path("/proc").glob("[0-9]*"):
                with contextlib.suppress(OSError):
                    stats[int(d.name)] = (d / "stat").read_text().rsplit(")", 1)[1].split()
            tree = {proc.pid}
            while grown := {c for c, fields in stats.items() if int(fields[1]) in tree} - tree:
                tree |= grown
            for pid in tree & stats.keys():  # utime + stime, per process (pid and start time)
                ticks[(pid, stats[pid][19])] = int(stats[pid][11]) + int(stats[pid][12])
                rss_pages = max(rss_pages, int(stats[pid][21]))
            if not series or time.perf_counter() - t0 - series[-1][0] >= 1.0:
                rss = {"total": sum(int(stats[pid][21]) for pid in tree & stats.keys()) * page_mib}
                for pid in tree & stats.keys():
                    with contextlib.suppress(OSError):
                        kind = Path(f"/proc/{pid}/comm").read_text().strip()
                        kind = "java" if kind == "java" else "python" if kind.startswith("python") else "other"
                        rss[kind] = max(rss.get(kind, 0.0), int(stats[pid][21]) * page_mib)
                if rss["total"] > 0:  # not the exiting tree's zombies
                    series.append((time.perf_counter() - t0, {k: v for k, v in rss.items() if v > 0}))
            time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[1]} failed (rc {proc.returncode}): see {log}")
    return (time.perf_counter() - t0, sum(ticks.values()) / os.sysconf("SC_CLK_TCK"), rss_pages * page_mib, series)


def flatness(series: list[tuple[float, dict[str, float]]]) -> dict:
    """Whether memory stays put while the images stream through: per kind of process, over the run's third quarter
    and a bit more (from half to 90 % of its time: the last tenth writes the output and tears down, where memory
    falls), the RSS at the start and the end of that window, its max, and the slope of a least-squares line through
    its samples (MiB/min), as bench/load.py reads the server's soak. Empty for runs too short to have one."""
    end = series[-1][0] if series else 0.0
    half = [(t, r) for t, r in series if end / 2 <= t <= 0.9 * end]
    if len(half) < 3:
        return {}
    out = {}
    for kind in ("python", "java", "total"):
        points = [(t, r[kind]) for t, r in half if kind in r]
        if len(points) >= 3:
            out[kind] = {"from_mib": round(points[0][1]), "to_mib": round(points[-1][1]),
                         "max_mib": round(max(r for _, r in points)),
                         "slope_mib_per_min": round(slope_mib_per_min(points), 2)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000, help="images (half REAL, half FAKE)")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--tools", nargs="+", choices=("predict", "spark"), default=["predict", "spark"])
    parser.add_argument("--smoke", action="store_true", help="16 images, one run of each tool (no start-up run), "
                        "a small model, Spark on local[1]")
    args = parser.parse_args()
    if args.smoke:
        args.master = "local[1]"
    folder, tiny = images(16 if args.smoke else args.n)
    n = sum(1 for _ in folder.rglob("*.jpg"))
    env = {**stage_env(), "MLFLOW_TRACKING_URI": register(SCRATCH / "spark-mlflow", args.smoke)}
    tools = {"predict": ["src/predict.py"], "spark": ["src/score_spark.py", "--master", args.master]}
    labels = {}
    for tool in args.tools:
        wall, cpu = {}, {}
        for what, where in (("full", folder),) if args.smoke else (("startup", tiny), ("full", folder)):
            out, load = OUT / f"spark-bench-{tool}-{what}.csv", loadavg()
            cmd = [sys.executable, *tools[tool], "--input", str(where), "--output", str(out), "--model",
                   f"models:/{NAME}@champion"]
            wall[what], cpu[what], peak, series = run(cmd, env, OUT / "logs" / f"spark-{tool}-{what}.log")
            k = 16 if what == "startup" else n
            emit(f"{tool}_{what}", load, images=k, wall_s=round(wall[what], 2), cpu_s=round(cpu[what], 1),
                 images_per_s=round(k / wall[what], 1), peak_rss_mib=round(peak),
                 master=args.master if tool == "spark" else None,
                 rss_streaming=flatness(series) if what == "full" else None)
            (OUT / "logs" / f"spark-{tool}-{what}-rss.json").write_text(json.dumps(series))
        if "startup" in wall:
            emit(f"{tool}_marginal", None, images=n - 16, images_per_s=round((n - 16) / (wall["full"] - wall[
                "startup"]), 1), images_per_cpu_s=round((n - 16) / (cpu["full"] - cpu["startup"]), 1))
        with open(out, newline="") as f:
            labels[tool] = {row[0]: row[1] for row in list(csv.reader(f))[1:]}
    if len(labels) == 2:
        assert labels["spark"] == labels["predict"], "the two tools disagree on some label"
        print(f"labels agree on all {len(labels['predict'])} images", file=sys.stderr)


if __name__ == "__main__":
    main()
