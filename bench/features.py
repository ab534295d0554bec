"""Backbone feature extraction against the machine's matmul ceiling.

    python bench/features.py            # matmul 4096², extraction on 4,096 images at 32 and 64, bf16 at 32
    python bench/features.py --small    # matmul 1024², 512 images at 32 only, a few seconds

Figures (one JSON line each):
- ``matmul``: ``tf.linalg.matmul`` of two n×n matrices, float32 and bfloat16, warmed up, >= 5 timed repeats;
  GFLOP/s = 2·n³ / median seconds. This is the ceiling a convolution-heavy forward pass can hope for.
- ``resnet50_flops``: multiply-adds of the backbone's Conv2D layers (x2), counted from the built model, next to the
  0.158 / 0.633 GFLOP per image the ceilings use.
- ``feature_extraction``: ``pipeline.features.extract(model, x_uint8, 256)`` with ``pipeline.model.build_model``
  (weights none, frozen). ``images_per_s`` is the steady state: the same compiled ``forward_fn(feature_extractor
  (model))`` that ``extract`` builds, warmed up on one batch, then ``pipeline.model.batched`` over all images.
  ``call_images_per_s`` is one whole ``extract`` call as a stage sees it (it builds and traces a new
  ``tf.function`` every call). ``ceiling_images_per_s`` = matmul GFLOP/s ÷ GFLOP per image.
- ``feature_extraction_predict``: ``feature_extractor(model).predict`` on the same [0, 1] floats, for comparison.
- ``feature_extraction`` with ``precision: mixed_bfloat16`` at 32 (ceiling: the bf16 matmul).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.common import emit, loadavg, repeat, summary, timed  # noqa: E402

GFLOP_PER_IMAGE = {32: 0.158, 64: 0.633}  # from /work/shared/MEASURED.md; checked by resnet50_flops below


def matmul_gflops(n: int, dtype: str, repeats: int) -> dict:
    import tensorflow as tf

    rng = np.random.default_rng(0)
    a = tf.cast(tf.constant(rng.standard_normal((n, n), dtype=np.float32)), dtype)
    b = tf.cast(tf.constant(rng.standard_normal((n, n), dtype=np.float32)), dtype)

    def once():
        c = tf.linalg.matmul(a, b)
        return float(c[0, 0])  # forces completion

    load = loadavg()
    seconds = repeat(once, repeats, warmup=2)
    flop = 2.0 * n ** 3
    return {"n": n, "dtype": dtype, "gflops": round(flop / statistics.median(seconds) / 1e9, 1),
            "gflops_best": round(flop / min(seconds) / 1e9, 1), **summary(seconds), "load_before": load}


def conv_gflops(model) -> float:
    """2 × multiply-adds of every Conv2D / Dense layer reachable from ``model`` (BN, ReLU, adds not counted)."""
    import keras

    total = 0
    stack = list(model.layers)
    while stack:
        layer = stack.pop()
        if isinstance(layer, keras.Model):
            stack.extend(layer.layers)
        elif isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw = layer.kernel_size
            c_in = layer.input.shape[-1]
            total += 2 * h * w * c_out * kh * kw * c_in
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * layer.input.shape[-1] * layer.units
    return total / 1e9


def make_cfg(image_size: int, precision: str = "float32"):
    from pipeline import config

    return config.Model(image_size=image_size, weights="none", trainable_from=None, precision=precision,
                        l2=1e-4, batch_size=256)


def extraction(image_size: int, precision: str, x: np.ndarray, batch: int, ceiling_gflops: float,
               with_predict: bool) -> None:
    import keras

    from pipeline import features
    from pipeline.model import batched, build_model, feature_extractor, forward_fn, set_precision, to_unit

    cfg = make_cfg(image_size, precision)
    model = build_model(cfg, 0.0, seed=42)
    gflop_img = GFLOP_PER_IMAGE[image_size]
    ceiling = ceiling_gflops / gflop_img
    common = {"image_size": image_size, "precision": precision, "images": len(x), "batch_size": batch,
              "gflop_per_image": gflop_img, "ceiling_gflops": ceiling_gflops,
              "ceiling_images_per_s": round(ceiling)}

    # One whole extract() call, as the tune/train stages make it (trace included).
    load = loadavg()
    call_s, feats = timed(lambda: features.extract(model, x, batch))  # noqa: F821  (ruff: confused by `del model`)
    assert feats.shape == (len(x), 2048), feats.shape

    # Steady state: the same compiled function, warm-up batch excluded.
    fn = forward_fn(feature_extractor(model))
    warm_s, _ = timed(lambda: batched(fn, x[:batch], batch))
    load_steady = loadavg()
    steady = repeat(lambda: batched(fn, x, batch), repeats=2, warmup=0)
    ips = len(x) / statistics.median(steady)
    emit("feature_extraction", load_steady, **common, images_per_s=round(ips, 1),
         fraction_of_ceiling=round(ips / ceiling, 3), **summary(steady),
         call_images_per_s=round(len(x) / call_s, 1), call_s=round(call_s, 2), first_batch_s=round(warm_s, 2),
         load_before_call=load, path="pipeline.features.extract / model.batched(forward_fn(feature_extractor))")

    if with_predict:
        ext = feature_extractor(model)
        xf = to_unit(x)
        ext.predict(xf[:batch], batch_size=batch, verbose=0)  # builds and traces predict_function once
        load = loadavg()
        secs = repeat(lambda: ext.predict(xf, batch_size=batch, verbose=0), repeats=2, warmup=0)
        ips = len(x) / statistics.median(secs)
        emit("feature_extraction_predict", load, **common, images_per_s=round(ips, 1),
             fraction_of_ceiling=round(ips / ceiling, 3), **summary(secs),
             path="feature_extractor(model).predict(float32 numpy)")
    del model
    keras.backend.clear_session()
    set_precision("float32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="1024² matmul, 512 images at 32 only")
    parser.add_argument("--no-bf16", action="store_true", help="skip the mixed_bfloat16 extraction")
    args = parser.parse_args()
    n, n_img = (1024, 512) if args.small else (4096, 4096)
    batch = 256

    import tensorflow as tf  # noqa: F401  (import cost kept out of the figures)

    mm = {}
    for dtype in ("float32", "bfloat16"):
        r = matmul_gflops(n, dtype, repeats=5 if args.small else 7)
        load = r.pop("load_before")
        mm[dtype] = r["gflops"]
        emit("matmul", load, path="tf.linalg.matmul", **r)

    from pipeline.model import build_model

    for size in (32, 64):
        m = build_model(make_cfg(size), 0.0, seed=42)
        emit("resnet50_flops", None, image_size=size, counted_gflop_per_image=round(conv_gflops(m), 4),
             assumed_gflop_per_image=GFLOP_PER_IMAGE[size], note="2 x MACs of Conv2D + Dense layers")
        del m

    x = np.random.default_rng(0).integers(0, 256, (n_img, 32, 32, 3), dtype=np.uint8)
    extraction(32, "float32", x, batch, mm["float32"], with_predict=True)
    if not args.small:
        extraction(64, "float32", x, batch, mm["float32"], with_predict=True)
    if not args.no_bf16:
        extraction(32, "mixed_bfloat16", x, batch, mm["bfloat16"], with_predict=False)


if __name__ == "__main__":
    main()
