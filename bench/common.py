"""What the benchmark scripts share: the machine description, one-JSON-line-per-figure output, a timer, and the
scratch folders.

Every figure line carries ``machine`` (cores, CPU model, library versions, date, the 1-minute load average at the
moment the figure was measured, and whether ``/tmp/quiet.flag`` said the machine was otherwise idle) and the exact
command that produced it. Scripts import this as ``from bench.common import ...`` after putting the repository
root on ``sys.path``.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"  # small scratch outputs (git-ignored)
# Large scratch trees (tens of thousands of files, repository copies) live outside the repository: `dvc repro`
# in the real workspace walks the whole tree looking for dvc.yaml files, and bench/out is not in .dvcignore.
SCRATCH = Path(os.environ.get("BENCH_SCRATCH", "/tmp/cifake-bench"))
QUIET_FLAG = Path("/tmp/quiet.flag")

# Quiet TensorFlow/MLflow/tqdm before anything imports them.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TQDM_DISABLE", "1")

# The pipeline's TensorFlow environment (oneDNN on) before any benchmark imports TensorFlow: without it gradients on
# an AVX2-only CPU run many times slower, and a benchmark would measure a configuration the pipeline never runs.
import pipeline  # noqa: E402,F401


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> float:
    """The 1-minute load average: above ~0.3 on this 2-core machine, wall-time figures are pessimistic."""
    return round(os.getloadavg()[0], 2)


def git_state() -> str:
    """HEAD of the repository, with "+dirty" when the library, stages or params have uncommitted edits (other
    engineers work in the same tree, so the code measured is not always a commit)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "pipeline", "src", "params.yaml", "dvc.yaml"],
                               cwd=ROOT, capture_output=True, text=True, timeout=5).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine(**extra) -> dict:
    """Cores, CPU, versions (read from package metadata: no TensorFlow import), UTC time, load average."""
    return {
        "cores": len(os.sched_getaffinity(0)),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "tensorflow": _version("tensorflow-cpu") or _version("tensorflow"),
        "keras": _version("keras"),
        "numpy": _version("numpy"),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_1m": loadavg(),
        "quiet_flag": QUIET_FLAG.exists(),
        "git": git_state(),
        **extra,
    }


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def emit(figure: str, load_before: float | None = None, **fields) -> dict:
    """Print one figure as a JSON line (flushed) and return it. ``load_before``: the load average recorded just
    before the measurement started (the one that matters); the machine block also has the one at print time."""
    row = {"figure": figure, **fields, "loadavg_1m_before": load_before, "command": command(), "machine": machine()}
    print(json.dumps(row), flush=True)
    return row


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def repeat(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    return [timed(fn)[0] for _ in range(repeats)]


def summary(seconds: list[float]) -> dict:
    return {"median_s": round(statistics.median(seconds), 4), "min_s": round(min(seconds), 4),
            "max_s": round(max(seconds), 4), "repeats": len(seconds)}


def run_logged(cmd: list[str], cwd: Path, env: dict | None = None, log: Path | None = None,
               timeout: float | None = None) -> tuple[float, subprocess.CompletedProcess]:
    """Run ``cmd``; return (wall seconds, completed process). Output is captured and, with ``log``, saved."""
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ {shlex.join(cmd)}\n# rc {out.returncode}, {seconds:.2f} s\n--- stdout\n{out.stdout}"
                       f"\n--- stderr\n{out.stderr}")
    return seconds, out


def stage_env(repo: Path | None = None) -> dict:
    """The environment a pipeline subprocess gets: quiet, no telemetry, no tracking URI leaking in; with ``repo``
    (a copy of the repository), that copy's ``pipeline`` package first on the path, so the stages run the code that
    was copied, not the editable install's live working tree (which may be edited while a long benchmark runs)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "MLFLOW_DISABLE_TELEMETRY": "true", "TQDM_DISABLE": "1",
           "PYTHON": sys.executable}
    env.pop("MLFLOW_TRACKING_URI", None)
    if repo is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH", "")) if p)
    return env


def ran_stages(dvc_stdout: str) -> list[str]:
    """Stage names from ``Running stage '...'`` lines of ``dvc repro`` output, in order."""
    return [line.split("'")[1] for line in dvc_stdout.splitlines() if line.startswith("Running stage '")]


def sample_data(train_per_class: int, test_per_class: int, seed: int = 42) -> tuple[Path, Path, float]:
    """The built-in sample (``pipeline.sample.write_sample``) and its preprocessed arrays (``pipeline.data.
    preprocess``, val_fraction 0.2) under SCRATCH, made once and reused. Returns (raw, processed, seconds spent
    making them now; 0 when reused)."""
    from pipeline import config, data, sample

    root = SCRATCH / f"sample-{train_per_class}-{test_per_class}-seed{seed}"
    raw, processed, marker = root / "raw", root / "processed", root / ".complete"
    if marker.exists():
        return raw, processed, 0.0
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    sample.write_sample(raw, config.Sample(train_per_class=train_per_class, test_per_class=test_per_class,
                                           jpeg_quality=95), seed, progress=False)
    cfg = config.Preprocess(val_fraction=0.2, resize="resize", max_bad_fraction=0.01, max_pixels=16777216,
                            duplicates="report", duplicate_similarity=0.99)
    data.preprocess(raw, processed, cfg, seed, progress=False)
    marker.touch()
    return raw, processed, time.perf_counter() - t0
