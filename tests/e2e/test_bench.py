"""The benchmarks in bench/ run: each script at its smallest size (``--smoke``), as a subprocess from the repository
root, exits 0 and prints the figures it exists for; and no file or folder in bench/ takes the name of a module
(``python bench/X.py`` puts bench/ first on sys.path: a bench/openvino.py once hid the openvino package from every
script there). Figures are not checked: at these sizes they mean nothing."""
from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"

# For each benchmark script: the figures (or attacks) its smoke run must print, one JSON line each.
EXPECTED = {
    "duplicates": {"duplicates"},
    "fullscale": {"fullscale_stage", "fullscale_floors", "fullscale_total", "fullscale_noop_repro"},
    "load": {"start", "load", "soak", "hostile"},
    "native": {"native"},
    "robustness": {"attack", "fgsm", "transfer", "square-3", "mark", "worst"},
    "sample": {"generate"},
    "spark": {"predict_full"},  # with SMOKE_ARGS: the Spark tool's answers are test_score_spark's to check
    "throughput": {"matmul", "features", "attack", "head_fit"},
}
# The Spark tool's smoke run started a JVM and a Python worker importing TensorFlow to re-check what
# tests/use/test_score_spark.py checks on every label, against predict, on a messier folder: the smoke runs predict
# (its cost: bench/README.md#the-test-suite).
SMOKE_ARGS = {"spark": ["--tools", "predict"]}


def _needs(script: str) -> str | None:
    """Why ``script`` cannot run on this machine, or None."""
    if script == "spark":
        from tests.use.test_score_spark import SPARK_MISSING  # the Spark test's own check: one reason, one place

        return SPARK_MISSING
    if script == "fullscale" and not Path("/usr/bin/time").exists():
        return "bench/fullscale.py times each stage with /usr/bin/time (Debian's `time` package), missing here"
    return None


def test_every_benchmark_has_a_smoke_check() -> None:
    # common: the scripts' helpers; mutation_table: mutation.sh's report (mutmut runs the tests, no smoke size)
    scripts = {p.stem for p in BENCH.glob("*.py")} - {"common", "mutation_table"}
    assert scripts == set(EXPECTED), "a bench/ script without a smoke check here, or one listed that is gone"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One scratch folder (BENCH_SCRATCH) for all the smoke runs: the 16 + 8 image sample is made once for all."""
    return tmp_path_factory.mktemp("bench-scratch")


# load's smoke run starts `mlflow models serve`: the slow one.
@pytest.mark.parametrize("script", [pytest.param(s, marks=[pytest.mark.slow] if s == "load" else [])
                                    for s in sorted(EXPECTED)])
def test_benchmark_runs_at_its_smallest_size(script: str, scratch: Path) -> None:
    if reason := _needs(script):
        pytest.skip(reason)
    env = {**os.environ, "BENCH_SCRATCH": str(scratch), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, f"bench/{script}.py", "--smoke", *SMOKE_ARGS.get(script, [])], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=420)
    assert out.returncode == 0, f"bench/{script}.py --smoke failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    seen = {r["figure"] for r in rows} | {r.get("attack") for r in rows}
    assert EXPECTED[script] <= seen, f"missing {EXPECTED[script] - seen} in:\n{out.stdout[-3000:]}"
    assert all(r["machine"]["cpu"] and r["machine"]["date"] and r["command"] for r in rows)


def test_nothing_in_bench_takes_a_module_name() -> None:
    elsewhere = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
    hidden = {}
    for path in BENCH.iterdir():
        name = path.stem if path.suffix == ".py" else path.name
        if path.suffix not in ("", ".py") or name == "__pycache__":
            continue
        found = importlib.machinery.PathFinder.find_spec(name, elsewhere)
        if found is not None or name in sys.stdlib_module_names or name in sys.builtin_module_names:
            hidden[path.name] = found and (found.origin or list(found.submodule_search_locations or []))
    assert not hidden, f"in bench/, these hide the modules of the same name: {hidden}"


def test_the_floor_counts_the_arithmetic_the_pipeline_runs() -> None:
    from bench import common
    from pipeline import config
    from pipeline.model import network

    cfg = config.load(ROOT / "params.yaml").model
    assert common.forward_gflop(network.build_model(cfg, 0.0, 0)) == pytest.approx(common.GFLOP_PER_IMAGE_32, abs=5e-4)


def test_the_floor_counts_each_stages_passes() -> None:
    from bench import common
    from bench.fullscale import STAGES, floor_gflop
    from pipeline import config

    p = config.load(ROOT / "params.yaml")
    n = {"train": 8000, "val": 2000, "test": 2000}
    floors = {s: floor_gflop(s, p, n, {"train": 20}) for s in STAGES}
    f = common.GFLOP_PER_IMAGE_32
    assert floors["fetch"] == floors["preprocess"] == 0
    assert floors["predict"] == pytest.approx(2 * 2000 * f)  # Test_1 and Test_2, a forward pass each
    assert floors["tune"] >= 10_000 * f  # every train and validation image through the backbone once
    # evaluate: per model at least the clean pass, FGSM's gradient and PGD-20 on the diagnostic images
    ev = p.evaluate
    assert floors["evaluate"] > 2 * (2000 * 3 * f + ev.diagnostic_images * ev.diagnostic.steps * 2 * f)
    assert floors["advtrain"] > p.advtrain.epochs * 8000 * 3 * f  # a training step per image and epoch
    more = config.load(ROOT / "params.yaml", ["evaluate.diagnostic.steps=40"])
    assert floor_gflop("evaluate", more, n, {}) > floors["evaluate"]  # more steps, more arithmetic
    # As run (the attacks let fooled images go): the budgets' gradients and queries replaced by those spent
    full = {"gradients": 2 * (2000 + 2000 * ev.diagnostic.steps + 500 * 20 + 500),
            "queries": 2 * 200 * ev.attacks[1].queries}
    assert floor_gflop("evaluate", p, n, full) == pytest.approx(floors["evaluate"], rel=0.02)
    half = {"gradients": full["gradients"] // 2, "queries": full["queries"]}
    assert floor_gflop("evaluate", p, n, half) == pytest.approx(
        floor_gflop("evaluate", p, n, full) - full["gradients"] * f)  # half the gradients, 2F each


def test_fullscale_fails_a_run_whose_stage_reaches_four_gib() -> None:
    # issue #40's memory budget, asserted by the benchmark (a figure, not a timed test)
    from bench.fullscale import over_memory_budget

    rows = [{"stage": "train", "peak_rss_mib": 2900.0}, {"stage": "evaluate", "peak_rss_mib": 4095.9}]
    assert over_memory_budget(rows, "fullscale-1") is None
    rows[1]["peak_rss_mib"] = 4096.0
    said = over_memory_budget(rows, "fullscale-1")
    assert said.startswith("fullscale: evaluate peaked at 4096 MiB") and "fullscale-1-evaluate.log" in said


def test_spark_bench_reads_memory_growth_while_the_images_stream_not_at_start_up_or_exit() -> None:
    from bench.spark import flatness

    def run(rss_at) -> list[tuple[float, dict[str, float]]]:  # 100 s sampled once a second
        return [(float(t), {"python": rss_at(t), "total": rss_at(t) + 100}) for t in range(101)]

    # start-up climbs to 1,000 MiB, the streaming holds it, the exit frees it: flat
    flat = flatness(run(lambda t: min(50 * t, 1000) if t <= 95 else 200))
    assert flat["python"] == {"from_mib": 1000, "to_mib": 1000, "max_mib": 1000, "slope_mib_per_min": 0.0}
    # 1 MiB a second more while streaming: 60 MiB/min, whatever the exit does
    leak = flatness(run(lambda t: 500 + t if t <= 95 else 200))
    assert leak["python"]["slope_mib_per_min"] == pytest.approx(60.0)
    assert leak["total"]["to_mib"] == 500 + 90 + 100
    assert flatness([(0.0, {"python": 1.0})]) == {}
