"""What the benchmark scripts share: the machine description, one-JSON-line-per-figure output, timing, scratch
folders, the built-in sample they run on, and a throwaway copy of the repository for `dvc repro`.

Every figure line carries ``machine`` (cores, CPU model, library versions, UTC date, the 1-minute load average when
it was printed, whether ``/tmp/quiet.flag`` said the machine was otherwise idle, the git HEAD) and the exact command.
Scripts import this as ``from bench.common import ...`` after putting the repository root on ``sys.path``.
"""
from __future__ import annotations

import datetime as dt
import functools
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"  # small outputs and logs (git-ignored)
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
    """The 1-minute load average: above ~0.3 on a 2-core machine, wall-time figures are pessimistic."""
    return round(os.getloadavg()[0], 2)


@functools.cache
def git_state() -> str:
    """HEAD when the run started, with "+dirty" when the library, stages or params had uncommitted edits (other
    engineers work in the same tree, so the code measured is not always a commit)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "pipeline", "src", "params.yaml", "dvc.yaml"],
                               cwd=ROOT, capture_output=True, text=True, timeout=5).stdout.strip()
        return (head or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict:
    """Cores, CPU, versions (read from package metadata: no TensorFlow import), UTC time, load average, git."""
    return {"cores": len(os.sched_getaffinity(0)), "cpu": cpu_model(), "python": platform.python_version(),
            "tensorflow": _version("tensorflow-cpu") or _version("tensorflow"), "keras": _version("keras"),
            "numpy": _version("numpy"), "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "loadavg_1m": loadavg(), "quiet_flag": QUIET_FLAG.exists(), "git": git_state()}


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def emit(figure: str, load_before: float | None = None, **fields) -> dict:
    """Print one figure as a JSON line (flushed) and return it. ``load_before``: the load average recorded just
    before the measurement started (the one that matters); the machine block has the one at print time."""
    row = {"figure": figure, **fields, "loadavg_1m_before": load_before, "command": command(), "machine": machine()}
    print(json.dumps(row), flush=True)
    return row


def slope_mib_per_min(samples: list[tuple[float, float]]) -> float:
    """The slope of a least-squares line through (seconds, MiB) samples, in MiB a minute: how a long-running
    process's memory moves (0.0 with fewer than two samples)."""
    if len(samples) < 2:
        return 0.0
    return statistics.linear_regression([t / 60 for t, _ in samples], [r for _, r in samples]).slope


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# ResNet50 + head forward at 32x32 as the pipeline computes it (forward_gflop of pipeline.model.twin.compute_twin): the
# multiply-adds x2 of its matrix products. The plain graph's convolutions also multiply the zero padding of the
# 2x2 and 1x1 maps: 0.158.
GFLOP_PER_IMAGE_32 = 0.130


def forward_gflop(model) -> float:
    """GFLOP of one image's forward pass through ``model``'s compute twin: each convolution's taps x channels x
    filters per output pixel (a small-map one as the twin's matrix product), each Dense layer's weights, x2."""
    import keras
    import numpy as np

    from pipeline.model.twin import TwinConv, compute_twin

    def walk(m):
        for layer in m.layers:
            if isinstance(layer, keras.Model):
                yield from walk(layer)
            elif isinstance(layer, TwinConv) and layer.matmul:
                (_, h, w, c), k = layer.input.shape, layer.conv.kernel.shape
                yield 2 * layer.output.shape[1] * layer.output.shape[2] * c * k[-1] * (1 if k[0] == 1 else h * w)
            elif isinstance(layer, (keras.layers.Conv2D, TwinConv)):
                _, h, w, f = layer.output.shape
                yield 2 * h * w * int(np.prod((layer.conv if isinstance(layer, TwinConv) else layer).kernel.shape))
            elif isinstance(layer, keras.layers.Dense):
                yield 2 * int(np.prod(layer.kernel.shape))
    return sum(walk(compute_twin(model))) / 1e9


def matmul_gflops(n: int = 4096) -> float:
    """float32 ``tf.linalg.matmul`` n x n GFLOP/s, median of 5: the ceiling figures are read against."""
    import statistics

    import tensorflow as tf

    a = tf.random.normal((n, n), seed=0)
    fn = tf.function(lambda a: tf.linalg.matmul(a, a))
    fn(a).numpy()
    return 2 * n**3 / statistics.median(timed(lambda: fn(a).numpy())[0] for _ in range(5)) / 1e9


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


# Copied as tests/e2e/test_e2e.py copies the repository: no outputs, caches, history or benchmarks.
SKIP = {".git", ".dvc/tmp", ".dvc/cache", "data", "models", "mlruns", "metrics", "plots", "predictions", "reports",
        "optuna", ".cache", "bench", ".pytest_cache", ".ruff_cache", "dvc.lock", ".benchmarks"}


def copy_repo(dst: Path, values: dict[tuple[str, ...], object]) -> None:
    """The working tree without outputs, caches or history, with ``values`` set in params.yaml, as a fresh git
    repository with one commit (what `dvc repro` in a clone sees)."""
    import yaml

    def ignore(folder: str, names: list[str]) -> set[str]:
        rel = Path(folder).relative_to(ROOT)
        return {n for n in names if (rel / n).as_posix() in SKIP or n == "__pycache__"}

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(ROOT, dst, ignore=ignore)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    for keys, value in values.items():
        node = params
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=b@b", "-c", "user.name=bench", "commit", "-qm", "bench copy"]):
        subprocess.run(cmd, cwd=dst, check=True)


def sample_data(train_per_class: int, test_per_class: int, seed: int = 42) -> tuple[Path, Path, float]:
    """The built-in sample (``pipeline.data.sample.write_sample``) and its arrays
    (``pipeline.data.preprocess.preprocess`` with
    params.yaml's preprocess settings) under SCRATCH, made once and reused. Returns (raw, processed, seconds spent
    making them now; 0 when reused)."""
    from pipeline import config
    from pipeline.data import preprocess, sample

    root = SCRATCH / f"sample-{train_per_class}-{test_per_class}-seed{seed}"
    if root.exists():
        return root / "raw", root / "processed", 0.0
    t0 = time.perf_counter()
    tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")  # renamed into place whole: a parallel run may race
    sample.write_sample(tmp / "raw", config.Sample(train_per_class=train_per_class, test_per_class=test_per_class,
                                                   jpeg_quality=95), seed, progress=False)
    preprocess.preprocess(tmp / "raw", tmp / "processed", config.load(ROOT / "params.yaml").preprocess, seed,
                          progress=False)
    try:
        tmp.rename(root)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return root / "raw", root / "processed", time.perf_counter() - t0


def tiny_model(seed: int = 0):
    """A small random classifier with the interface of ``pipeline.model.network.build_model``'s
    (pixels in [0, 1] -> pooled
    features at the layer ``gap`` -> a logit -> P(FAKE) at the float32 sigmoid layer ``prob``) for the smoke runs:
    its graphs trace in about a second where ResNet50's take tens of seconds, and a smoke run checks a script's
    code, not the model's speed."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    logit = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D(name="gap")(x))
    return keras.Model(inputs, keras.layers.Activation("sigmoid", dtype="float32", name="prob")(logit))
