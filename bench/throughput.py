"""Throughput of the pipeline's hot paths against what the machine can do: backbone features, attacks and the
head's training loop. bench/fullscale.py times the stages end to end; these say which part moved.

    python bench/throughput.py                 # every part at the size of bench/README.md's figures
    python bench/throughput.py features head   # some parts
    python bench/throughput.py head -S tune.batch_size=1024   # params.yaml overrides, as the stages take them
    python bench/throughput.py --smoke         # the smallest sizes, features and attacks on bench.common.tiny_model

One JSON line per figure, the pipeline's own code with params.yaml's settings:

* ``matmul``: ``tf.linalg.matmul`` 4096² float32 GFLOP/s (median of 5), the ceiling the parts below are read against.
* ``features``: the runner ``pipeline.fit.features.extract`` uses (params.yaml's ``inference`` engine) on 4,096 random
  images after a first batch (conversion or tracing, given apart): images/s against matmul GFLOP/s ÷ ResNet50's
  ``common.GFLOP_PER_IMAGE_32`` an image at 32×32 (the compute twin's multiply-adds ×2; they scale with the
  image's area).
* ``attacks``: ``pipeline.judge.attacks.Attacker.perturb`` with ``evaluate.attack`` and ``evaluate.diagnostic`` on 2,048
  images after one untimed batch (tracing): images/s and input-gradient passes/s.
* ``twin``: the plain graph against ``pipeline.model.twin.compute_twin`` (the convolutions on 2x2 and 1x1 maps as matrix
  products), 2,048 images at ``evaluate.batch_size`` after an untimed pass: TensorFlow's forward pass and input
  gradient, OpenVINO's forward pass (float32); images/s of each graph, the largest difference in logit and the
  gradient signs' agreement.
* ``head``: one ``pipeline.fit.training.HeadTrainer`` (as tune shares one among its trials) on 80,000 × 2,048 random
  features (20,000 validation), 2 fits of 4 epochs at ``tune.batch_size``: seconds an epoch after the first, against
  the floor, the epoch's matrix FLOPs (forward 2·(2048·256 + 256·64 + 64) a row, backward twice that, the validation
  pass) at the matmul rate; the rest is memory-bound work (batch norm, dropout, Adam, gathers).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.common import GFLOP_PER_IMAGE_32, emit, loadavg, matmul_gflops, timed, tiny_model  # noqa: E402

PARTS = ("features", "attacks", "head", "twin")


def features(params, built, x: np.ndarray, gflops: float) -> None:
    from pipeline.model import inference, network

    extractor, bs = network.feature_extractor(built), params.model.batch_size
    first_s, _ = timed(lambda: inference.runner(extractor, params.inference)(x[:bs], bs))  # converts or traces
    run = inference.runner(extractor, params.inference)  # the same runner: kept on the model
    load = loadavg()
    seconds, out = timed(lambda: run(x, bs))
    assert len(out) == len(x), out.shape
    ceiling = gflops / (GFLOP_PER_IMAGE_32 * (params.model.image_size / 32) ** 2)
    emit("features", load, engine=inference.describe(params.inference), images=len(x), batch_size=bs,
         first_call_s=round(first_s, 2), images_per_s=round(len(x) / seconds, 1), ceiling_images_per_s=round(ceiling),
         fraction_of_ceiling=round(len(x) / seconds / ceiling, 3), matmul_gflops=round(gflops, 1))


def attacks(params, built, x: np.ndarray, y: np.ndarray) -> None:
    from pipeline.judge.attacks import Attacker

    bs = params.evaluate.batch_size
    for attack in (params.evaluate.attack, params.evaluate.diagnostic):
        attacker = Attacker(built, attack, params.base.seed)
        first_s, _ = timed(lambda: attacker.perturb(x[:bs], y[:bs], bs))
        load = loadavg()
        seconds, adv = timed(lambda: attacker.perturb(x, y, bs))
        passes = 1 if attack.name == "fgsm" else attack.steps * attack.restarts
        emit("attack", load, attack=attack.describe(), images=len(x), batch_size=bs, first_batch_s=round(first_s, 2),
             seconds=round(seconds, 2), images_per_s=round(len(x) / seconds, 1),
             gradient_passes_per_s=round(passes * len(x) / seconds, 1),
             max_change_255=round(float(np.abs(adv - x / 255.0).max() * 255), 3))


def twin(params, built, x: np.ndarray, y: np.ndarray) -> None:
    import keras
    import tensorflow as tf

    from pipeline.judge import attacks
    from pipeline.model import inference
    from pipeline.model.twin import logits_model

    bs, yb = params.evaluate.batch_size, tf.constant(y[:, None].astype(np.float32))
    # A Sequential around a model hides its graph from compute_twin: the plain convolutions, for TF and OpenVINO.
    plain = keras.Model(built.input, built.get_layer("prob").input)
    logits = {"twin": logits_model(built), "plain": keras.Sequential([keras.Input((32, 32, 3)), plain])}
    spec = [tf.TensorSpec((None, 32, 32, 3), tf.float32), tf.TensorSpec((None, 1), tf.float32)]
    out: dict[tuple[str, str], np.ndarray] = {}

    def batches(fn) -> np.ndarray:
        return np.concatenate([fn(tf.constant(inference.to_unit(x[i:i + bs])), yb[i:i + bs]).numpy()
                               for i in range(0, len(x), bs)])

    for graph, net in logits.items():
        forward = tf.function(lambda b, labels, net=net: net(b, training=False), input_signature=spec)
        margin_gradient = attacks.margin_gradient_of(net)  # the attacks' own, through this graph

        def gradient(b, labels, g=margin_gradient):
            return tf.sign(g(b, tf.reshape(labels, (-1,)))[1])

        ov = inference.OpenVinoRunner(net, "f32")
        passes = {"tensorflow forward": lambda f=forward: batches(f),
                  "tensorflow input gradient": lambda g=gradient: batches(g),
                  "openvino forward": lambda r=ov: r(x, bs)}
        for name, run in passes.items():
            run()  # traces or warms up
            load = loadavg()
            seconds, out[graph, name] = timed(run)
            emit("twin", load, graph=graph, part=name, images=len(x), batch_size=bs,
                 images_per_s=round(len(x) / seconds, 1), seconds=round(seconds, 2))
    for name in ("tensorflow forward", "openvino forward"):
        emit("twin_difference", None, part=name,
             max_abs_logit_difference=float(np.abs(out["twin", name] - out["plain", name]).max()))
    signs = out["twin", "tensorflow input gradient"] == out["plain", "tensorflow input gradient"]
    emit("twin_difference", None, part="tensorflow input gradient", sign_agreement=round(float(signs.mean()), 6))


def head(params, n: int, epochs: int, gflops: float) -> None:
    import keras

    from pipeline.fit import training

    rng, nv, batch = np.random.default_rng(0), n // 4, params.tune.batch_size
    data = training.Arrays(rng.standard_normal((n, 2048), dtype=np.float32), (rng.random(n) < 0.5).astype(np.uint8),
                           rng.standard_normal((nv, 2048), dtype=np.float32), (rng.random(nv) < 0.5).astype(np.uint8))
    forward = 2 * (2048 * 256 + 256 * 64 + 64)
    floor_s = (n * 3 * forward + nv * forward) / (gflops * 1e9)
    trainer = training.HeadTrainer(data, params.model.l2, batch)
    for fit in range(2):
        marks: list[float] = []

        class Clock(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                marks.append(time.perf_counter())

        load, t0 = loadavg(), time.perf_counter()
        trainer.fit(0.3, 1e-3, epochs, [Clock()], seed=fit)
        epochs_s = [b - a for a, b in zip([t0, *marks], marks)]
        steady = statistics.median(epochs_s[1:] or epochs_s)
        emit("head_fit", load, fit=fit, n_train=n, n_val=nv, batch_size=batch, first_epoch_s=round(epochs_s[0], 3),
             seconds_per_epoch=round(steady, 3), floor_s=round(floor_s, 3), times_floor=round(steady / floor_s, 2),
             peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", metavar="PART", help=f"any of {', '.join(PARTS)} (default: all)")
    parser.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="params.yaml override, e.g. inference.precision=bf16 (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="every part at its smallest size (seconds)")
    args = parser.parse_args()
    if unknown := set(args.parts) - set(PARTS):
        parser.error(f"unknown part(s) {sorted(unknown)}: choose from {', '.join(PARTS)}")
    parts = args.parts or PARTS

    from pipeline import config
    from pipeline.model import network

    params = config.load(ROOT / "params.yaml", args.overrides)
    load = loadavg()
    gflops = matmul_gflops(512 if args.smoke else 4096)
    emit("matmul", load, n=512 if args.smoke else 4096, dtype="float32", gflops=round(gflops, 1))
    if {"features", "attacks", "twin"} & set(parts):
        built = tiny_model() if args.smoke else network.build_model(params.model, 0.0, params.base.seed)
        x = np.random.default_rng(0).integers(0, 256, (16 if args.smoke else 4096, 32, 32, 3), dtype=np.uint8)
        if "features" in parts:
            features(params, built, x, gflops)
        n = 16 if args.smoke else 2048  # attacked and compared images
        if "attacks" in parts:
            attacks(params, built, x[:n], np.arange(n) % 2)
        if "twin" in parts:
            twin(params, built, x[:n], np.arange(n) % 2)
    if "head" in parts:
        head(params, 512 if args.smoke else 80_000, 2 if args.smoke else 4, gflops)


if __name__ == "__main__":
    main()
