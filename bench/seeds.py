"""How much the default run's scores move with the seed: the whole pipeline once per seed.

    python bench/seeds.py                 # seeds 0 1 2, default params otherwise (~8 min each on 2 cores)
    python bench/seeds.py --seeds 42 7

``base.seed`` seeds everything: the built-in sample (other crops, another fitted generator), the split, the random
backbone, tuning, training and the attacks' random starts. Each seed runs ``dvc repro`` in its own temporary copy
of the repository (see bench/noop_repro.py); one JSON line per seed with the headline figures of
``metrics/evaluate.json`` for both models, then one line with the spread (min, max) of each.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import OUT, SCRATCH, emit, loadavg, run_logged, stage_env  # noqa: E402
from bench.noop_repro import copy_repo  # noqa: E402


def headline(m: dict) -> dict[str, float]:
    out = {}
    for prefix, model in (("", m), ("baseline_", m["baseline"])):
        out[f"{prefix}weighted_f1"] = model["weighted_f1"]
        out[f"{prefix}robust_score"] = model["robust_score"]
        for split in ("clean", "adversarial", "diagnostic"):
            out[f"{prefix}{split}_balanced_accuracy"] = model[split]["balanced_accuracy"]
        out[f"{prefix}threshold"] = model["threshold"]
    for name, bound in m.get("sample_bounds", {}).get("eps8", {}).items():  # what the built-in sample proves
        if name != "epsilon":
            out[f"{name}_bound_eps8"] = bound
    return {k: round(v, 4) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        repo = SCRATCH / f"seed-{seed}"
        copy_repo(repo, {("base", "seed"): seed})
        load = loadavg()
        seconds, out = run_logged(["dvc", "repro"], repo, stage_env(repo), OUT / "logs" / f"seed-{seed}.log", 3 * 3600)
        if out.returncode != 0:
            emit("seed_failed", load, seed=seed, stderr_tail=out.stderr[-2000:])
            raise SystemExit(1)
        row = headline(json.loads((repo / "metrics" / "evaluate.json").read_text()))
        rows.append(row)
        emit("seed_run", load, seed=seed, wall_s=round(seconds, 1), **row)
    spread = {k: [min(r[k] for r in rows), max(r[k] for r in rows)] for k in rows[0]}
    emit("seed_spread", None, seeds=args.seeds, **spread)


if __name__ == "__main__":
    main()
