"""OpenVINO beside TensorFlow: the same classifier and feature extractor, the same inputs, in one process.

    python bench/engines.py                     # 4,096 images, batch 256 (a few minutes on 2 cores)
    python bench/engines.py --images 1024       # quicker
    python bench/engines.py --trained           # also bf16 vs f32 labels of the trained models on the test split
    python bench/engines.py --trained-only      # only those labels (clean and attacked), no speed figures

OpenVINO (2026.4.1) is a project dependency since the pipeline's inference passes run on it
(``pipeline.inference``). Its converter sends telemetry unless a consent file says no or it believes it runs in
CI; this script sets ``CI=true`` in its own environment before importing openvino, as ``pipeline.inference`` does
around each conversion.

Three paths, side by side: TensorFlow (the compiled function), OpenVINO as a peer would use it (SavedModel export,
fixed batch, ``AsyncInferQueue``), and the project's own ``pipeline.inference.runner`` (below).

What it measures, all in one process, on N seeded random uint8 32x32x3 images (``pipeline.model.to_unit`` per
batch, as the pipeline does):

- the models: ``build_model(config.load(params.yaml, ["model.trainable_from=null"]).model, dropout=0.0, seed=42)``
  (the frozen default; weights ``none``: a random backbone with the same FLOPs) -> P(FAKE), and
  ``feature_extractor(model)`` -> the 2048 pooled features that ``pipeline.features.extract`` caches.
- TensorFlow: the project's own compiled path, ``batched(forward_fn(m), x, batch)``, warmed up on one batch, then
  3 timed passes over all images (``bench.common.repeat``); images/s from the median.
- OpenVINO: each Keras model is written with ``model.export(dir)`` (a TF SavedModel) and converted with
  ``ov.convert_model(dir)``; the batch dimension is fixed to ``--batch`` (``ov.Model.reshape``; a short last batch
  is zero-padded and its padding dropped), compiled for ``CPU`` with ``PERFORMANCE_HINT: THROUGHPUT`` and
  ``INFERENCE_PRECISION_HINT`` f32, then bf16, and run through an ``AsyncInferQueue`` of
  ``OPTIMAL_NUMBER_OF_INFER_REQUESTS`` requests; warm-up one batch, 3 timed passes, median, as for TensorFlow.

Figures (one JSON line each, ``bench.common.emit``):
- ``openvino_conversion``: seconds for ``model.export`` and for ``ov.convert_model``, per model.
- ``openvino_compiled``: per model and precision, the properties OpenVINO chose (requests, streams, threads, the
  inference precision it reports) and the compile seconds; or the error if it refused.
- ``inference``: one line per engine x precision x model (``full`` = P(FAKE), ``features``): ``images_per_s``
  (images / median seconds of a full pass), ``ratio_to_tf_f32`` (over TensorFlow float32 on the same model in this
  run), the timing summary, and agreement with TensorFlow float32 on the same inputs:
  ``max_abs_err``; ``max_rel_err`` = max|ov - tf| / max|tf| (relative to the output's scale: ReLU features have
  many values near 0, where an element-wise ratio means nothing); ``max_elem_rel_err`` = max of |ov - tf| /
  max(|tf|, 1e-3 max|tf|) element-wise; for ``full`` also ``label_agreement_0.5`` (share of images with the same
  label at P(FAKE) >= 0.5) and ``label_agreement_median`` (the same at the median of TensorFlow's P(FAKE), which
  splits the images in half: with a random backbone and an untrained head P(FAKE) sits in a narrow band, so 0.5
  may put every image on one side), and TensorFlow's P(FAKE) min / median / max.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Python puts this script's folder first on sys.path, where this very file would shadow the openvino package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.common import SCRATCH, emit, loadavg, repeat, summary, timed  # noqa: E402

os.environ.setdefault("CI", "true")  # OpenVINO's converter: no telemetry (see the docstring)


def errors(ov_out: np.ndarray, tf_out: np.ndarray) -> dict:
    diff = np.abs(ov_out.astype(np.float64) - tf_out.astype(np.float64))
    scale = float(np.max(np.abs(tf_out)))
    floor = max(scale * 1e-3, 1e-12)
    return {"max_abs_err": float(f"{diff.max():.3g}"),
            "max_rel_err": float(f"{diff.max() / max(scale, 1e-12):.3g}"),
            "max_elem_rel_err": float(f"{np.max(diff / np.maximum(np.abs(tf_out), floor)):.3g}")}


def labels(p_ov: np.ndarray, p_tf: np.ndarray) -> dict:
    med = float(np.median(p_tf))
    return {"label_agreement_0.5": round(float(np.mean((p_ov >= 0.5) == (p_tf >= 0.5))), 4),
            "label_agreement_median": round(float(np.mean((p_ov >= med) == (p_tf >= med))), 4),
            "median_threshold": float(f"{med:.6g}"),
            "tf_p_fake_min_median_max": [float(f"{v:.6g}") for v in (p_tf.min(), med, p_tf.max())],
            "tf_share_fake_0.5": round(float(np.mean(p_tf >= 0.5)), 4)}


def ov_runner(compiled, x: np.ndarray, batch: int):
    """A function that runs all of ``x`` (uint8) through ``compiled`` in an AsyncInferQueue; returns the outputs."""
    import openvino as ov

    from pipeline.model import to_unit

    nreq = compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
    out_tail = tuple(int(d) for d in compiled.output(0).get_partial_shape().to_shape()[1:])

    def run(xs: np.ndarray = x) -> np.ndarray:
        out = np.empty((len(xs), *out_tail), np.float32)
        queue = ov.AsyncInferQueue(compiled, nreq)

        def done(request, start):
            n = min(batch, len(xs) - start)
            out[start:start + n] = request.get_output_tensor(0).data[:n]

        queue.set_callback(done)
        for start in range(0, len(xs), batch):
            xb = to_unit(xs[start:start + batch])
            if len(xb) < batch:
                xb = np.concatenate([xb, np.zeros((batch - len(xb), *xb.shape[1:]), np.float32)])
            queue.start_async({0: xb}, userdata=start)
        queue.wait_all()
        return out

    return run, nreq


def measured(run, x: np.ndarray, batch: int, repeats: int, reference: np.ndarray, name: str) -> tuple:
    """``run`` (images -> outputs) warmed up on one batch, then timed over all of ``x``: the load before timing,
    images/s (median pass) and the figures of its line: timing summary, first batch, agreement with ``reference``
    (TensorFlow float32 on the same images), and labels for the full model."""
    warm_s, _ = timed(lambda: run(x[:batch]))
    load = loadavg()
    secs = repeat(lambda: run(x), repeats, warmup=0)
    out = run(x)
    agree = errors(out, reference)
    if name == "full":
        agree |= labels(out[:, 0], reference[:, 0])
    return load, len(x) / statistics.median(secs), {**summary(secs), "first_batch_s": round(warm_s, 2), **agree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trained", action="store_true",
                        help="also bf16 vs f32 labels of the trained models (models/) on the whole test split")
    parser.add_argument("--trained-only", action="store_true", help="only the labels of --trained")
    args = parser.parse_args()
    if args.trained_only:
        return trained_agreement(args.batch)

    import openvino as ov
    import tensorflow as tf  # noqa: F401  (import cost kept out of the figures)

    from pipeline import config
    from pipeline.model import batched, build_model, feature_extractor, forward_fn

    cfg = config.load(ROOT / "params.yaml", ["model.trainable_from=null"]).model
    model = build_model(cfg, dropout=0.0, seed=42)
    models = {"full": model, "features": feature_extractor(model)}
    x = np.random.default_rng(0).integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    common = {"images": args.images, "batch_size": args.batch, "image_size": cfg.image_size,
              "weights": cfg.weights, "openvino": ov.get_version()}

    # TensorFlow, the project's compiled path.
    tf_out, tf_ips = {}, {}
    for name, m in models.items():
        fn = forward_fn(m)
        warm_s, _ = timed(lambda: batched(fn, x[:args.batch], args.batch))  # noqa: B023
        load = loadavg()
        secs = repeat(lambda: batched(fn, x, args.batch), args.repeats, warmup=0)  # noqa: B023
        tf_out[name] = batched(fn, x, args.batch)
        tf_ips[name] = args.images / statistics.median(secs)
        p = tf_out[name][:, 0]
        extra = {"tf_p_fake_min_median_max": [float(f"{v:.6g}") for v in (p.min(), np.median(p), p.max())],
                 "tf_share_fake_0.5": round(float(np.mean(p >= 0.5)), 4)} if name == "full" else {}
        emit("inference", load, engine="tensorflow", precision=cfg.precision, model=name,
             images_per_s=round(tf_ips[name], 1), ratio_to_tf_f32=1.0, **summary(secs),
             first_batch_s=round(warm_s, 2), path="batched(forward_fn(m))", **common,
             **extra)

    # OpenVINO: export -> convert -> fixed batch.
    core = ov.Core()
    work = SCRATCH / "openvino"
    shutil.rmtree(work, ignore_errors=True)
    ov_models = {}
    for name, m in models.items():
        saved = work / f"{name}_savedmodel"
        export_s, _ = timed(lambda: m.export(str(saved), verbose=False))  # noqa: B023
        convert_s, ovm = timed(lambda: ov.convert_model(str(saved)))  # noqa: B023
        ovm.reshape({ovm.input(0).get_any_name(): ov.PartialShape([args.batch, 32, 32, 3])})
        ov_models[name] = ovm
        emit("openvino_conversion", None, model=name, method="keras model.export -> ov.convert_model(SavedModel)",
             export_s=round(export_s, 2), convert_s=round(convert_s, 2),
             inputs=[str(i.get_partial_shape()) for i in ovm.inputs],
             outputs=[str(o.get_partial_shape()) for o in ovm.outputs], **common)

    for precision in ("f32", "bf16"):
        for name, ovm in ov_models.items():
            props = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": precision}
            try:
                compile_s, compiled = timed(lambda: core.compile_model(ovm, "CPU", props))  # noqa: B023
            except Exception as err:  # noqa: BLE001  (report the refusal, go on)
                emit("openvino_compiled", None, model=name, precision=precision, error=f"{type(err).__name__}: "
                     f"{err}"[:2000], **common)
                continue
            chosen = {}
            for key in ("OPTIMAL_NUMBER_OF_INFER_REQUESTS", "NUM_STREAMS", "INFERENCE_NUM_THREADS",
                        "INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT"):
                try:
                    value = compiled.get_property(key)
                    chosen[key] = value.get_type_name() if isinstance(value, ov.Type) else str(value)
                except Exception as err:  # noqa: BLE001
                    chosen[key] = f"unavailable ({type(err).__name__})"
            emit("openvino_compiled", None, model=name, precision=precision, compile_s=round(compile_s, 2),
                 properties=chosen, **common)
            run, nreq = ov_runner(compiled, x, args.batch)
            load, ips, figures = measured(run, x, args.batch, args.repeats, tf_out[name], name)
            emit("inference", load, engine="openvino", precision=precision, model=name,
                 images_per_s=round(ips, 1), ratio_to_tf_f32=round(ips / tf_ips[name], 3), **figures,
                 infer_requests=nreq,
                 path="ov.AsyncInferQueue(core.compile_model(convert_model(SavedModel)), THROUGHPUT)", **common)
            del compiled

    # The project's own path: pipeline.inference (in-memory conversion of the traced graph, dynamic batch,
    # requests waited on in the calling thread), as every stage runs it.
    from pipeline import inference

    for precision in ("f32", "bf16"):
        engine = config.Inference(engine="openvino", precision=precision)
        for name, m in models.items():
            setup_s, runner = timed(lambda: inference.runner(m, engine))  # noqa: B023
            load, ips, figures = measured(lambda xs: runner(xs, args.batch), x, args.batch,  # noqa: B023
                                          args.repeats, tf_out[name], name)
            emit("inference", load, engine="pipeline.inference (openvino)", precision=precision, model=name,
                 images_per_s=round(ips, 1), ratio_to_tf_f32=round(ips / tf_ips[name], 3), **figures,
                 setup_s=round(setup_s, 2), infer_requests=runner.requests,
                 path="inference.runner(m, Inference(engine=openvino))", **common)
    if args.trained:
        trained_agreement(args.batch)


def trained_agreement(batch: int) -> None:
    """bf16 against f32 on the trained models of the last `dvc repro`, over the whole test split, clean and attacked
    as evaluate attacks it (white-box, in TensorFlow: the mission's attack on every image, the PGD diagnostic on
    evaluate.diagnostic_images): the share of images whose label (at each model's own threshold) is the same."""
    from pipeline import config, inference, predicting
    from pipeline.attacks import Attacker, to_uint8
    from pipeline.data import load_split, stratified_subset

    params = config.load(ROOT / "params.yaml")
    ev = params.evaluate
    test = load_split(ROOT / params.paths.processed, "test")
    pgd_pick = stratified_subset(test.y, ev.diagnostic_images, params.base.seed)
    for path in (params.paths.model_adv, params.paths.model):
        model, threshold = predicting.load_with_threshold(str(ROOT / path))
        threshold = 0.5 if threshold is None else threshold
        sets = {"clean": test.x,
                "fgsm": to_uint8(Attacker(model, ev.attack, params.base.seed).perturb(test.x, test.y, ev.batch_size)),
                "pgd": to_uint8(Attacker(model, ev.diagnostic, params.base.seed).perturb(
                    test.x[pgd_pick], test.y[pgd_pick], ev.batch_size))}
        for name, x in sets.items():
            p = {prec: inference.probabilities(model, x, config.Inference(engine="openvino", precision=prec), batch)
                 for prec in ("f32", "bf16")}
            p_tf = inference.probabilities(model, x, config.Inference(engine="tensorflow"), batch)
            same = (p["bf16"] >= threshold) == (p["f32"] >= threshold)
            emit("bf16_labels_trained", None, model=str(path), images=name, n=len(x), threshold=threshold,
                 label_agreement_bf16_vs_f32=round(float(np.mean(same)), 5), labels_differing=int((~same).sum()),
                 label_agreement_f32_vs_tf=round(float(np.mean((p["f32"] >= threshold) == (p_tf >= threshold))), 5),
                 max_abs_err_bf16=float(f"{np.abs(p['bf16'] - p['f32']).max():.3g}"),
                 max_abs_err_f32_vs_tf=float(f"{np.abs(p['f32'] - p_tf).max():.3g}"))


if __name__ == "__main__":
    main()
