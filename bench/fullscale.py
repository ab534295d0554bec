"""The whole pipeline at CIFAKE size, stage by stage: wall time and peak memory.

    python bench/fullscale.py                # 100,000 + 20,000 images (targets: <= 8 min at 485 GFLOP/s, <= 4 GiB)
    python bench/fullscale.py --scale 0.02   # everything shrunk
    python bench/fullscale.py --smoke        # the smallest sizes, fetch and preprocess only: checks it runs

In a temporary copy of the repository (``bench.common.copy_repo``: no data, models, mlruns, .git, DVC cache; git
init + commit) with these params (the rest from params.yaml; model.weights stays ``none``: the scores are those of a
random frozen backbone on the built-in sample, so the costs are what this measures):

    sample.train_per_class 50000·s, sample.test_per_class 10000·s
    model.trainable_from null (frozen backbone: tune and train fit heads on cached features)
    tune.n_trials 20·s (>= 2), tune.epochs 20·s (>= 1), tune.objective clean
    train.epochs 60·s (>= 1), train.patience 8·s (>= 1), train.batch_size 256
    advtrain, evaluate, inference: params.yaml (adversarial training bounded by advtrain.images_per_epoch and
    advtrain.val_images; the mission's attack on every test image, the others on evaluate.diagnostic_images)

Each stage runs on its own, in pipeline order, as ``/usr/bin/time dvc repro -s <stage>``: one JSON line per
stage (wall time; its arithmetic floor ``floor_s``, the FLOPs of the passes it runs (:func:`floor_gflop`) at the
float32 matmul rate measured at the start of the same run, and ``x_floor``, their ratio, the figure of merit that
holds across CPUs and noisy hours; CPU; peak RSS, the largest single process of the stage; and, through a
``python`` shim on PATH that runs the stage script under ``/usr/bin/time``, the script's own wall time and peak
RSS, so that DVC's own share, hashing and caching the outputs, shows), then the total, then a no-op ``dvc repro``
at this size (DVC's cost of deciding there is nothing to do). It exits non-zero when a stage's peak RSS reaches 4 GiB.
Logs go to bench/out/logs/fullscale-*.log; the
copy, with its metrics/, stays under the scratch folder.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402
from bench.common import OUT, SCRATCH, copy_repo, emit, loadavg, ran_stages, run_logged, stage_env  # noqa: E402
from pipeline import config  # noqa: E402

STAGES = ("fetch", "preprocess", "tune", "train", "advtrain", "evaluate", "predict")
MEMORY_BUDGET_MIB = 4 * 1024  # peak RSS of any one stage's largest process, at CIFAKE size too
TIME_FORMAT = "%e %M %U %S"  # /usr/bin/time: wall s, peak RSS KiB (the largest single process), user s, system s


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


def floor_gflop(stage: str, p, n: dict[str, int], epochs_run: dict[str, int]) -> float:
    """GFLOP of the passes ``stage`` runs under params ``p`` (``config.Params``) on splits of ``n`` images: a forward
    pass F (ResNet50 and head at model.image_size), an input gradient 2F (forward, then backward to the pixels), a
    training step 3F; the head on cached features H. Grad-CAM and all that is not a matrix product are left out.
    ``epochs_run``: what the stage did where its params only bound it: head epochs (tune, train), and evaluate's
    ``gradients`` and ``queries`` (:func:`evaluate_work`: its attacks let fooled images go); without these, the
    bounds."""
    f = common.GFLOP_PER_IMAGE_32 * (p.model.image_size / 32) ** 2
    h = 2 * (2048 * 256 + 256 * 64 + 64) / 1e9
    ev, adv = p.evaluate, p.advtrain

    def attacked(a, images: int) -> float:  # the attack's gradients and a forward pass of its result
        steps = 1 if a.name == "fgsm" else a.steps * a.restarts
        return images * (steps * 2 * f + f)

    if stage == "tune":  # backbone features of train and validation once, then the heads
        epochs = epochs_run.get("tune", p.tune.n_trials * p.tune.epochs)
        return (n["train"] + n["val"]) * f + epochs * (n["train"] * 3 + n["val"]) * h
    if stage == "train":
        return epochs_run.get("train", p.train.epochs) * (n["train"] * 3 + n["val"]) * h
    if stage == "advtrain":
        images = min(adv.images_per_epoch or n["train"], n["train"])
        val = min(adv.val_images or n["val"], n["val"])
        # each epoch: the attack on its share of each batch and a training step; epoch 0 and each epoch scored on
        # validation (clean and attacked); the threshold under the diagnostic attack
        return (adv.epochs * images * (adv.adv_ratio * (attacked(adv.attack, 1) - f) + 3 * f)
                + (adv.epochs + 1) * val * (f + attacked(adv.attack, 1)) + val * (f + attacked(ev.diagnostic, 1)))
    if stage == "evaluate":
        test = n["test"]
        sub = min(ev.diagnostic_images or test, test)
        curve = min(ev.curve_images or test, test)
        # FGSM's signs serve every epsilon: its curve costs forward passes only
        one = (test * f + attacked(ev.attack, test) + attacked(ev.diagnostic, sub) + len(ev.corruptions) * sub * f
               + sum(curve * f if ev.attack.name == "fgsm" else attacked(ev.attack, curve)
                     for e in ev.epsilons if e not in (0, ev.attack.epsilon)))
        # Square at its whole query budget (an image stops once flipped); transfer on the defended model only
        per_image = {"apgd": lambda a: 2 * (a.steps * a.restarts * 2 + 1) * f,
                     "square": lambda a: 2 * (a.queries + 1) * f, "transfer": lambda a: f}
        budget = 2 * one + sum(min(a.images or sub, sub) * per_image[a.name](a) for a in ev.attacks)
        if "gradients" not in epochs_run:
            return budget
        # As run: every forward pass above, and only the gradients and queries the attacks spent
        forward = {"apgd": lambda a: 2 * f, "square": lambda a: 2 * 2 * f, "transfer": lambda a: f}
        return (2 * (one - attacked(ev.attack, test) - attacked(ev.diagnostic, sub) + test * f + sub * f)
                + sum(min(a.images or sub, sub) * forward[a.name](a) for a in ev.attacks)
                + 2 * f * epochs_run["gradients"] + f * epochs_run["queries"])
    if stage == "predict":
        return 2 * n["test"] * f
    return 0.0


def epochs_run(repo: Path, p) -> dict[str, int]:
    """The head epochs tune's trials (pruned ones stop early) and train ran: the floor counts these."""
    runs = {}
    if (repo / "metrics" / "train.json").exists():
        runs["train"] = json.loads((repo / "metrics" / "train.json").read_text())["epochs_run"]
    if (repo / "metrics" / "tune.json").exists():
        import optuna

        from pipeline.fit import studies
        study = optuna.load_study(study_name=json.loads((repo / "metrics" / "tune.json").read_text())["study"],
                                  storage=studies.storage(p.tune.storage.replace(":///", f":///{repo}/", 1)))
        runs["tune"] = sum(len(t.intermediate_values) for t in study.trials)
    return runs


def evaluate_work(tracking_uri: str, experiment: str) -> dict[str, int]:
    """Images through an input gradient, and Square's forward queries, over the passes the last evaluate computed
    (both models; read back from its cache: nothing): its MLflow run's ``gradients.*`` and ``queries.*``."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    run = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], "tags.stage = 'evaluate'",
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    return {kind: int(sum(v for k, v in run.data.metrics.items() if k.startswith(f"{kind}.")))
            for kind in ("gradients", "queries")}


def python_shim(folder: Path, times: Path, repo: Path) -> dict:
    """An environment whose ``python`` (what the dvc.yaml commands call) is the real interpreter under
    ``/usr/bin/time``, appending its figures to ``times``: the stage script's own cost, apart from DVC's (start-up,
    hashing, copying outputs into its cache)."""
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "python"
    shim.write_text(f'#!/bin/sh\nexec /usr/bin/time -a -o "{times}" -f "{TIME_FORMAT}" "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    env = stage_env(repo)
    env["PATH"] = f"{folder}:{env.get('PATH', '')}"
    return env


def read_times(times: Path) -> dict:
    """The last line /usr/bin/time appended to ``times`` (the stage's own), or {} if none."""
    if not times.exists() or not times.read_text().strip():
        return {}
    wall, rss, user, sys_ = times.read_text().split()[-4:]
    cpu_s = round(float(user) + float(sys_), 1)
    return {"wall_s": float(wall), "cpu_s": cpu_s, "peak_rss_mib": round(int(rss) / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink sizes, trials and epochs by this factor")
    parser.add_argument("--until", choices=STAGES, default=STAGES[-1], help="stop after this stage")
    parser.add_argument("--smoke", action="store_true", help="--scale 0 (the smallest sizes) --until preprocess")
    args = parser.parse_args()
    if args.smoke:
        args.scale, args.until = 0.0, "preprocess"
    (OUT / "logs").mkdir(parents=True, exist_ok=True)  # /usr/bin/time -o writes there; a fresh clone has no bench/out
    stages = STAGES[: STAGES.index(args.until) + 1]
    values = scaled_params(args.scale)
    repo = SCRATCH / f"fullscale-{args.scale:g}"
    copy_repo(repo, values)
    params = {".".join(k): v for k, v in values.items()}
    tag = f"fullscale-{args.scale:g}"
    rate = common.matmul_gflops()
    emit("fullscale_params", None, scale=args.scale, params=params, repo=str(repo), matmul_gflops=round(rate, 1))
    p = config.load(repo / "params.yaml")

    total_wall, total_cpu, peak, rows = 0.0, 0.0, 0, []
    for stage in stages:
        load = loadavg()
        log, whole, own = (OUT / "logs" / f"{tag}-{stage}{suffix}" for suffix in (".log", ".times", ".script-times"))
        whole.unlink(missing_ok=True)
        own.unlink(missing_ok=True)
        _, out = run_logged(["/usr/bin/time", "-o", str(whole), "-f", TIME_FORMAT, "dvc", "repro", "-s", stage], repo,
                            python_shim(SCRATCH / "shim", own, repo), log, timeout=4 * 3600)
        if out.returncode != 0:
            emit("fullscale_stage_failed", load, stage=stage, rc=out.returncode, log=str(log),
                 stderr_tail=out.stderr[-2000:])
            raise SystemExit(1)
        t, script = read_times(whole), read_times(own)
        n = {k: len(np.load(repo / "data" / "processed" / k / "y.npy")) for k in ("train", "val", "test")
             } if stage not in ("fetch", "preprocess") else {}
        runs = {}  # what the stage did where its params only bound it
        if stage in ("tune", "train"):
            runs = epochs_run(repo, p)
        elif stage == "evaluate":
            runs = evaluate_work(p.mlflow.tracking_uri.replace(":///", f":///{repo}/", 1), p.mlflow.experiment)
        floor = floor_gflop(stage, p, n, runs) / rate if n else 0.0
        row = {"stage": stage, **t, "floor_s": round(floor, 1),
               "x_floor": round(t["wall_s"] / floor, 2) if floor > 1 else None, "script_wall_s": script.get("wall_s"),
               "script_peak_rss_mib": script.get("peak_rss_mib"),
               "dvc_overhead_s": round(t["wall_s"] - script["wall_s"], 1) if script else None,
               "ran": ran_stages(out.stdout + out.stderr)}
        rows.append(row)
        total_wall += row["wall_s"]
        total_cpu += row["cpu_s"]
        peak = max(peak, row["peak_rss_mib"])
        emit("fullscale_stage", load, scale=args.scale, **row, log=str(log.relative_to(ROOT)))

    outcome = {}  # each stage's scalar metrics, and evaluate's balanced accuracies (the rest: the copy's metrics/)
    for name in ("tune", "train", "advtrain", "evaluate"):
        f = repo / "metrics" / f"{name}.json"
        m = json.loads(f.read_text()) if f.exists() else {}
        outcome[name] = {k: v for k, v in m.items() if isinstance(v, int | float)}
        outcome[name].update({f"{k}_balanced_accuracy": m[k]["balanced_accuracy"] for k in
                              ("clean", "adversarial", "diagnostic") if isinstance(m.get(k), dict)})
    emit("fullscale_floors", None, matmul_gflops=round(rate, 1),
         table=[{k: r[k] for k in ("stage", "wall_s", "floor_s", "x_floor")} for r in rows],
         wall_at_485_gflops_min=round(total_wall * rate / 485 / 60, 1), floor_s=sum(r["floor_s"] for r in rows))
    emit("fullscale_total", None, scale=args.scale, wall_s=round(total_wall, 1), wall_min=round(total_wall / 60, 1),
         cpu_s=round(total_cpu, 1), peak_rss_mib=peak, peak_stage=max(rows, key=lambda r: r["peak_rss_mib"])["stage"],
         target_wall_min_at_485_gflops=8, target_peak_gib=4, meets_wall=total_wall * rate / 485 <= 8 * 60,
         meets_memory=peak < MEMORY_BUDGET_MIB, params=params, outcome=outcome)

    # A no-op at this size: the whole pipeline, or (with --until) the stages run so far.
    targets = [] if stages == STAGES else [args.until]
    load = loadavg()
    noop_s, out = run_logged(["dvc", "repro", *targets], repo, stage_env(repo), OUT / "logs" / f"{tag}-noop.log")
    emit("fullscale_noop_repro", load, scale=args.scale, seconds=round(noop_s, 2), stages_ran=ran_stages(out.stdout),
         targets=targets, rc=out.returncode)
    over = over_memory_budget(rows, tag)
    if over:
        sys.exit(over)


def over_memory_budget(rows: list[dict], tag: str) -> str | None:
    """The benchmark's memory assertion: what to say when a stage's largest process reached 4 GiB, else None."""
    worst = max(rows, key=lambda r: r["peak_rss_mib"])
    if worst["peak_rss_mib"] < MEMORY_BUDGET_MIB:
        return None
    return (f"fullscale: {worst['stage']} peaked at {worst['peak_rss_mib']:.0f} MiB of RSS, over the "
            f"{MEMORY_BUDGET_MIB} MiB (4 GiB) budget; its log: bench/out/logs/{tag}-{worst['stage']}.log")


if __name__ == "__main__":
    main()
