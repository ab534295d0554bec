"""How fast DVC decides there is nothing (or little) to do.

    python bench/noop_repro.py            # whole pipeline on a tiny sample, then the no-op and the epsilon edit
    python bench/noop_repro.py --small    # only fetch + preprocess (dvc repro preprocess), then its no-op
    python bench/noop_repro.py --small --cifake   # the same with CIFAKE's 120,000 images (where the files are)

In a temporary copy of the repository (copied as tests/test_e2e.py does: without data, models, mlruns, .git, DVC
cache, bench, ...; then git init + commit) with tiny params (sample 48/16 per class, tune.n_trials 2, tune.epochs
1, train.epochs 1, advtrain.epochs 1, evaluate.epsilons [0, 8]; everything else from params.yaml):

- ``repro_first``: the first ``dvc repro`` (every stage), wall time;
- ``repro_noop``: ``dvc repro`` again, 3 repeats, median (target < 5 s), with ``dvc --version`` as the floor
  (starting DVC itself);
- ``repro_after_epsilon_edit``: ``evaluate.attack.epsilon`` 8 -> 4 in params.yaml, then ``dvc repro``: wall
  time and which stages ran (expected: evaluate and predict).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import OUT, SCRATCH, emit, loadavg, ran_stages, run_logged, stage_env  # noqa: E402

SKIP = {".git", ".dvc/tmp", ".dvc/cache", "data", "models", "mlruns", "metrics", "plots", "predictions", "reports",
        "optuna", ".cache", "bench", ".pytest_cache", "dvc.lock", ".benchmarks"}
TINY = {
    ("sample", "train_per_class"): 48,
    ("sample", "test_per_class"): 16,
    ("tune", "n_trials"): 2,
    ("tune", "epochs"): 1,
    ("train", "epochs"): 1,
    ("advtrain", "epochs"): 1,
    ("evaluate", "epsilons"): [0, 8],
}


def copy_repo(dst: Path, values: dict[tuple[str, ...], object]) -> None:
    """The working tree without outputs, caches or history, with ``values`` set in params.yaml, as a fresh git
    repository with one commit (what `dvc repro` in a clone sees)."""
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


def repro(repo: Path, targets: list[str], log: str) -> tuple[float, list[str]]:
    seconds, out = run_logged(["dvc", "repro", *targets], repo, stage_env(repo), OUT / "logs" / log, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"dvc repro failed (rc {out.returncode}), see bench/out/logs/{log}:\n{out.stderr[-3000:]}")
    return seconds, ran_stages(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="fetch + preprocess only")
    parser.add_argument("--cifake", action="store_true", help="CIFAKE size: 50,000 + 10,000 per class")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    targets = ["preprocess"] if args.small else []
    repo = SCRATCH / "noop-repo"
    values = {**TINY, ("sample", "train_per_class"): 50_000, ("sample", "test_per_class"): 10_000} if args.cifake \
        else TINY
    copy_repo(repo, values)
    params = {".".join(k): v for k, v in values.items()}

    load = loadavg()
    first_s, ran = repro(repo, targets, "noop-first.log")
    emit("repro_first", load, seconds=round(first_s, 1), stages_ran=ran, targets=targets, tiny_params=params)

    version_s = statistics.median([run_logged(["dvc", "--version"], repo, stage_env(repo))[0] for _ in range(3)])
    load = loadavg()
    noop = []
    for i in range(args.repeats):
        s, ran = repro(repo, targets, f"noop-{i}.log")
        noop.append(s)
        if ran:
            raise SystemExit(f"no-op dvc repro ran {ran}")
    emit("repro_noop", load, median_s=round(statistics.median(noop), 2), all_s=[round(s, 2) for s in noop],
         dvc_version_s=round(version_s, 2), target_s=5, meets_target=statistics.median(noop) < 5,
         stages_ran=[], targets=targets)

    if args.small:
        return
    p = yaml.safe_load((repo / "params.yaml").read_text())
    before = p["evaluate"]["attack"]["epsilon"]
    p["evaluate"]["attack"]["epsilon"] = 4 if before != 4 else 8
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    load = loadavg()
    s, ran = repro(repo, targets, "noop-epsilon.log")
    emit("repro_after_epsilon_edit", load, seconds=round(s, 1), stages_ran=ran,
         edit=f"evaluate.attack.epsilon {before} -> {p['evaluate']['attack']['epsilon']}",
         expected=["evaluate", "predict"], as_expected=sorted(ran) == ["evaluate", "predict"])


if __name__ == "__main__":
    main()
