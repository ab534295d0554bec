"""Throughput of the predict tool, end to end and by part.

    python bench/predict.py            # the 20,000 32×32 JPEGs of the built-in sample's test split
    python bench/predict.py --small    # 512 JPEGs
    python bench/predict.py --scale    # the tool on 2,000 and on 20,000 images: time and peak memory

Figures (one JSON line each):
- ``predict_tool``: ``python src/predict.py --input DIR --output F --model M`` as a subprocess from the repository
  root (params.yaml read as the tool reads it), wall time and images/s, on the sample's ``raw/test`` folder; M is
  a model built with ``pipeline.model.build_model`` (weights none, frozen, 32×32) saved with ``pipeline.model.save``
  to bench/out/. ``predict_tool_startup`` is the same command on a folder of 16 of those images: the fixed cost
  (Python, TensorFlow import, model load, tracing).
- ``predict_read_folder``: ``pipeline.predicting.read_folder`` in-process (listing, safe decode, stack).
- ``predict_load_model``: ``pipeline.predicting.load_any_model(M)``.
- ``predict_proba``: ``pipeline.model.predict_proba(model, x, 256)`` on the decoded images: first call (it traces a
  new ``tf.function`` every call, as the tool pays), a second call, and the steady state of one compiled function
  warmed up on one batch.
- ``predict_scale`` (``--scale`` only): the tool on the first 2,000 and on all 20,000 images, wall time and peak
  RSS of the process (``/usr/bin/time``): the tool streams in chunks, so memory should not grow with the folder.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import OUT, SCRATCH, emit, loadavg, run_logged, sample_data, stage_env, timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="512 images")
    parser.add_argument("--scale", action="store_true", help="only the 2k vs 20k time and memory figure")
    args = parser.parse_args()
    raw, processed, made_s = sample_data(100 if args.small else 2000, 256 if args.small else 10_000)
    folder = raw / "test"
    n_files = sum(1 for _ in folder.rglob("*.jpg"))

    from pipeline import config, predicting
    from pipeline.model import batched, build_model, forward_fn, predict_proba, save

    OUT.mkdir(parents=True, exist_ok=True)
    model_path = OUT / "predict-model.keras"
    if not model_path.exists():
        params = config.load(ROOT / "params.yaml")
        cfg = params.model.model_copy(update={"trainable_from": None, "weights": "none", "image_size": 32,
                                              "precision": "float32"})
        save(build_model(cfg, 0.0, seed=42), model_path)

    def subset(name: str, per_class: int) -> Path:
        """The first ``per_class`` images of each class of the test folder, copied to a scratch folder."""
        target = SCRATCH / name
        shutil.rmtree(target, ignore_errors=True)
        for cls in ("REAL", "FAKE"):
            (target / cls).mkdir(parents=True)
            for p in sorted((folder / cls).glob("*.jpg"))[:per_class]:
                shutil.copy(p, target / cls / p.name)
        return target

    tiny = subset("predict-tiny", 8)  # the fixed cost: the tool on 16 images

    def tool(inp: Path, csv: Path, log: str) -> float:
        return tool_rss(inp, csv, log)[0]

    def tool_rss(inp: Path, csv: Path, log: str) -> tuple[float, float]:
        cmd = ["/usr/bin/time", "-f", "peak_rss_kib=%M", sys.executable, "src/predict.py", "--input", str(inp),
               "--output", str(csv), "--model", str(model_path)]
        seconds, out = run_logged(cmd, ROOT, stage_env(), OUT / "logs" / log)
        if out.returncode != 0:
            raise SystemExit(f"predict tool failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
        kib = int(out.stderr.rsplit("peak_rss_kib=", 1)[1].split()[0])
        return seconds, kib / 1024

    if args.scale:
        part = subset("predict-2k", 1000)
        for n, inp in ((2000, part), (n_files, folder)):
            load = loadavg()
            seconds, peak = tool_rss(inp, OUT / f"predict-{n}.csv", f"predict-{n}.log")
            emit("predict_scale", load, images=n, seconds=round(seconds, 2), images_per_s=round(n / seconds, 1),
                 peak_rss_mib=round(peak, 1), path="python src/predict.py --input DIR --output F --model M")
        return

    load = loadavg()
    startup_s = tool(tiny, OUT / "predict-tiny.csv", "predict-tiny.log")
    emit("predict_tool_startup", load, images=16, seconds=round(startup_s, 2),
         path="python src/predict.py --input 16 images --model M")

    load = loadavg()
    tool_s = tool(folder, OUT / "predict.csv", "predict.log")
    rows = sum(1 for _ in open(OUT / "predict.csv")) - 1
    emit("predict_tool", load, images=n_files, rows=rows, seconds=round(tool_s, 2),
         images_per_s=round(n_files / tool_s, 1), images_per_s_net_of_startup=round(n_files / (tool_s - startup_s), 1),
         model_mib=round(model_path.stat().st_size / 2**20, 1), sample_made_s=round(made_s, 1),
         path="python src/predict.py --input DIR --output F --model M")

    p = config.load(ROOT / "params.yaml")
    load = loadavg()
    secs, found = timed(lambda: predicting.read_folder(folder, p.preprocess.resize, p.preprocess.max_pixels))
    emit("predict_read_folder", load, images=len(found.names), bad=len(found.bad), seconds=round(secs, 2),
         images_per_s=round(len(found.names) / secs, 1), path="pipeline.predicting.read_folder")

    load = loadavg()
    secs, model = timed(lambda: predicting.load_any_model(str(model_path)))
    emit("predict_load_model", load, seconds=round(secs, 2), path="pipeline.predicting.load_any_model")

    bs = p.predict.batch_size
    load = loadavg()
    first_s, _ = timed(lambda: predict_proba(model, found.x, bs))
    second_s, _ = timed(lambda: predict_proba(model, found.x, bs))
    fn = forward_fn(model)  # steady state: one compiled function, warmed up on one batch
    batched(fn, found.x[:bs], bs)
    steady_s, _ = timed(lambda: batched(fn, found.x, bs))
    emit("predict_proba", load, images=len(found.x), batch_size=bs, first_call_s=round(first_s, 2),
         images_per_s_first_call=round(len(found.x) / first_s, 1), second_call_s=round(second_s, 2),
         images_per_s_second_call=round(len(found.x) / second_s, 1), steady_s=round(steady_s, 2),
         images_per_s=round(len(found.x) / steady_s, 1),
         path="pipeline.model.predict_proba (each call traces); steady: batched(forward_fn(model))")


if __name__ == "__main__":
    main()
