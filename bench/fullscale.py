"""The whole pipeline at CIFAKE size, stage by stage: wall time and peak memory.

    python bench/fullscale.py                # 100,000 train + 20,000 test images (targets: <= 15 min, <= 4 GiB)
    python bench/fullscale.py --scale 0.02   # everything shrunk, a smoke run

In a temporary copy of the repository (see bench/noop_repro.py: no data, models, mlruns, .git, DVC cache; git init
+ commit) with these params (the rest from params.yaml; model.weights stays ``none``: the scores are those of a
random frozen backbone on the built-in sample, so the costs are what this measures):

    sample.train_per_class 50000·s, sample.test_per_class 10000·s
    model.trainable_from null (frozen backbone: tune and train fit heads on cached features)
    tune.n_trials 20·s (>= 2), tune.epochs 20·s (>= 1), tune.objective clean
    train.epochs 60·s (>= 1), train.patience 8·s (>= 1), train.batch_size 256
    advtrain, evaluate, inference: params.yaml (PGD-3 adversarial training of the whole net, advtrain.epochs over
    advtrain.images_per_epoch images each, scored on advtrain.val_images; FGSM at epsilon 8 on every test image, the
    PGD-10 diagnostic on evaluate.diagnostic_images, the robustness curve on evaluate.curve_images)

each stage runs on its own, in pipeline order, as ``/usr/bin/time -v dvc repro -s <stage>``: one JSON line per
stage (wall time, CPU, peak RSS: the largest single process of the stage, DVC or the stage script; and, through a
``python`` shim on PATH that runs the stage script under ``/usr/bin/time``, the script's own wall time and peak
RSS, so that DVC's own share, hashing and caching the outputs, shows), then the total, then a no-op ``dvc repro``
at this size. Logs go to bench/out/logs/fullscale-*.log.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import OUT, SCRATCH, emit, loadavg, ran_stages, run_logged, stage_env  # noqa: E402
from bench.noop_repro import copy_repo  # noqa: E402

STAGES = ("fetch", "preprocess", "tune", "train", "advtrain", "evaluate", "predict")
GIB = 2**30


def scaled_params(s: float) -> dict[tuple[str, ...], object]:
    return {
        ("sample", "train_per_class"): max(16, round(50_000 * s)),
        ("sample", "test_per_class"): max(8, round(10_000 * s)),
        ("model", "trainable_from"): None,
        ("tune", "n_trials"): max(2, round(20 * s)),
        ("tune", "epochs"): max(1, round(20 * s)),
        ("tune", "objective"): "clean",
        ("train", "epochs"): max(1, round(60 * s)),
        ("train", "patience"): max(1, round(8 * s)),
        ("train", "batch_size"): 256,
    }


def parse_time_v(stderr: str) -> dict:
    def grab(label: str) -> str | None:
        m = re.search(rf"^\s*{re.escape(label)}: (.+)$", stderr, re.M)
        return m.group(1).strip() if m else None

    wall = grab("Elapsed (wall clock) time (h:mm:ss or m:ss)")
    parts = [float(p) for p in wall.split(":")] if wall else []
    wall_s = sum(p * 60 ** i for i, p in enumerate(reversed(parts))) if parts else None
    rss = grab("Maximum resident set size (kbytes)")
    return {"wall_s": wall_s, "user_s": float(grab("User time (seconds)") or 0),
            "sys_s": float(grab("System time (seconds)") or 0), "peak_rss_kib": int(rss) if rss else None,
            "exit_status": int(grab("Exit status") or -1)}


def python_shim(folder: Path, times: Path, repo: Path) -> dict:
    """An environment whose ``python`` (what the dvc.yaml commands call) is the real interpreter under
    ``/usr/bin/time``, appending "wall_s max_rss_kib user_s sys_s" to ``times``: the stage script's own cost,
    apart from DVC's (start-up, hashing, copying outputs into its cache)."""
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "python"
    shim.write_text(f'#!/bin/sh\nexec /usr/bin/time -a -o "{times}" -f "%e %M %U %S" "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    env = stage_env(repo)
    env["PATH"] = f"{folder}:{env.get('PATH', '')}"
    return env


def read_times(times: Path) -> dict | None:
    if not times.exists() or not times.read_text().strip():
        return None
    wall, rss, user, sys_ = times.read_text().split()[-4:]  # the stage's own line (the last one)
    return {"wall_s": float(wall), "peak_rss_kib": int(rss), "cpu_s": float(user) + float(sys_)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink sizes, trials and epochs by this factor")
    parser.add_argument("--until", choices=STAGES, default=STAGES[-1], help="stop after this stage (smoke tests)")
    args = parser.parse_args()
    stages = STAGES[: STAGES.index(args.until) + 1]
    values = scaled_params(args.scale)
    repo = SCRATCH / f"fullscale-{args.scale:g}"
    copy_repo(repo, values)
    params = {".".join(k): v for k, v in values.items()}
    tag = f"fullscale-{args.scale:g}"
    emit("fullscale_params", None, scale=args.scale, params=params, repo=str(repo))

    total_wall, total_cpu, peak, rows = 0.0, 0.0, 0, []
    for stage in stages:
        load = loadavg()
        log = OUT / "logs" / f"{tag}-{stage}.log"
        times = OUT / "logs" / f"{tag}-{stage}.times"
        times.unlink(missing_ok=True)
        seconds, out = run_logged(["/usr/bin/time", "-v", "dvc", "repro", "-s", stage], repo,
                                  python_shim(SCRATCH / "shim", times, repo), log, timeout=4 * 3600)
        t = parse_time_v(out.stderr)
        if t["exit_status"] != 0 or out.returncode != 0:
            emit("fullscale_stage_failed", load, stage=stage, rc=out.returncode, log=str(log),
                 stderr_tail=out.stderr[-2000:])
            raise SystemExit(1)
        own = read_times(times) or {}
        row = {"stage": stage, "wall_s": round(t["wall_s"] or seconds, 1), "cpu_s": round(t["user_s"] + t["sys_s"], 1),
               "peak_rss_mib": round(t["peak_rss_kib"] / 1024, 1), "script_wall_s": own.get("wall_s"),
               "script_peak_rss_mib": own.get("peak_rss_kib") and round(own["peak_rss_kib"] / 1024, 1),
               "dvc_overhead_s": own.get("wall_s") is not None and round((t["wall_s"] or seconds) - own["wall_s"], 1),
               "ran": ran_stages(out.stdout + out.stderr)}
        rows.append(row)
        total_wall += row["wall_s"]
        total_cpu += row["cpu_s"]
        peak = max(peak, t["peak_rss_kib"] * 1024)
        emit("fullscale_stage", load, scale=args.scale, **row, log=str(log.relative_to(ROOT)))

    extras = {}
    for name in ("train", "advtrain", "evaluate"):
        f = repo / "metrics" / f"{name}.json"
        if f.exists():
            m = json.loads(f.read_text())
            extras[name] = {k: m[k] for k in ("epochs_run", "weighted_f1", "robust_score", "n_test", "val_f1",
                                              "val_robust_score", "epochs") if k in m}
            if name == "evaluate":
                from bench.seeds import headline

                extras[name].update(headline(m))
    best = repo / "metrics" / "tune.json"
    if best.exists():
        extras["tune"] = {k: v for k, v in json.loads(best.read_text()).items() if k in ("trial", "value")}
    emit("fullscale_total", None, scale=args.scale, wall_s=round(total_wall, 1), wall_min=round(total_wall / 60, 1),
         cpu_s=round(total_cpu, 1), peak_rss_mib=round(peak / 2**20, 1),
         peak_stage=max(rows, key=lambda r: r["peak_rss_mib"])["stage"],
         target_wall_min=15, target_peak_gib=4, meets_wall=total_wall <= 15 * 60, meets_memory=peak < 4 * GIB,
         params=params, outcome=extras)

    # A no-op at this size: the whole pipeline, or (with --until) the stages run so far.
    targets = [] if stages == STAGES else [args.until]
    load = loadavg()
    noop_s, out = run_logged(["dvc", "repro", *targets], repo, stage_env(repo), OUT / "logs" / f"{tag}-noop.log")
    emit("fullscale_noop_repro", load, scale=args.scale, seconds=round(noop_s, 2), stages_ran=ran_stages(out.stdout),
         targets=targets, rc=out.returncode)


if __name__ == "__main__":
    main()
