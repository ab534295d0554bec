"""TensorFlow and OpenVINO in one process, under every import order and thread arrangement the project could
meet: does either crash natively (SIGSEGV, SIGABRT)? Issue #40's attempt to reproduce a segfault once seen at a
first OpenVINO pass.

    python bench/native.py                 # 3 import orders x 4 thread arrangements x 5 fresh processes, ResNet50
    python bench/native.py --reps 20       # more tries of each
    python bench/native.py --smoke         # two of the cases once, bench.common.tiny_model: checks it runs

Each try is a fresh Python process (two at a time, so they also compete for the cores) **without faulthandler**
(the crash went away under ``python -X faulthandler``), which:

1. imports in one ``order``: ``pipeline`` (``pipeline.model.inference`` first, as every stage does), ``tf-first``
   (tensorflow, then openvino) or ``ov-first`` (openvino before tensorflow and before pipeline's environment);
2. builds the model (``network.build_model`` with params.yaml's model section: ResNet50, weights none);
3. runs, by ``threads``:
   - ``main``: conversion and an OpenVINO pass (``inference.OpenVinoRunner``, as evaluate and predict run it) and a
     TensorFlow input gradient, all on the main thread;
   - ``thread``: the same in a worker thread;
   - ``concurrent``: the OpenVINO pass in one thread while another computes input gradients through TensorFlow;
   - ``reload``: evaluate's order: a runner for one model, its pass, the model and runner dropped and collected,
     then a second model converted and run (the baseline's objects freed while the defended model's are built).

One JSON line per (order, threads): tries, exits 0, native crashes (exit by a signal) and other failures, with the
last lines of a failing try's stderr. A crash or a failure makes the script exit 1; every try's stderr is in
bench/out/logs/native.log.
"""
from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDERS = ("pipeline", "tf-first", "ov-first")
THREADS = ("main", "thread", "concurrent", "reload")
SMOKE = [("ov-first", "concurrent"), ("pipeline", "reload")]  # two orders, two arrangements


def child(order: str, threads: str, smoke: bool) -> None:
    """One try, in this fresh process: exits 0, or dies."""
    import importlib

    for name in {"ov-first": ("openvino", "tensorflow"), "tf-first": ("tensorflow", "openvino")}.get(order, ()):
        importlib.import_module(name)  # in this order (an import sorter would reorder import statements)
    import gc
    import threading

    import numpy as np
    import tensorflow as tf

    from pipeline import config
    from pipeline.model import inference, network

    def model(seed: int):
        if smoke:
            from bench.common import tiny_model

            return tiny_model(seed)
        return network.build_model(config.load(ROOT / "params.yaml").model, 0.3, seed)

    x = np.random.default_rng(0).integers(0, 256, (64 if smoke else 512, 32, 32, 3), dtype=np.uint8)

    def openvino_pass(m) -> np.ndarray:
        return inference.OpenVinoRunner(m)(x, 128)

    def gradients(m, rounds: int = 4) -> None:
        for _ in range(rounds):
            batch = tf.convert_to_tensor(x[:64].astype(np.float32) / 255)
            with tf.GradientTape() as tape:
                tape.watch(batch)
                loss = tf.reduce_sum(m(batch, training=False))
            assert np.isfinite(tape.gradient(loss, batch).numpy()).all()

    m = model(0)
    if threads == "main":
        p = openvino_pass(m)
        gradients(m)
    elif threads == "thread":
        out = {}
        t = threading.Thread(target=lambda: out.update(p=openvino_pass(m), g=gradients(m)))
        t.start()
        t.join()
        p = out["p"]
    elif threads == "concurrent":
        gradients(m, 1)  # traced once first: the race looked for is between running passes, not tracing
        out = {}
        t = threading.Thread(target=lambda: out.update(p=openvino_pass(m)))
        t.start()
        gradients(m, 8)
        t.join()
        p = out["p"]
    else:  # reload
        openvino_pass(m)
        gradients(m, 1)
        del m
        gc.collect()
        second = model(1)
        p = openvino_pass(second)
        gradients(second, 1)
    assert p.shape == (len(x), 1) and np.isfinite(p).all()


def attempt(order: str, threads: str, smoke: bool, log: Path) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONFAULTHANDLER", "MLFLOW_TRACKING_URI")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", order, threads, *(["--smoke"] if smoke else [])]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    with open(log, "a") as f:
        f.write(f"--- {order} {threads}: rc {out.returncode}\n{out.stderr[-3000:]}\n")
    return out.returncode, out.stderr[-800:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="fresh processes per (order, threads)")
    parser.add_argument("--jobs", type=int, default=2, help="processes at once")
    parser.add_argument("--smoke", action="store_true", help="two cases once, bench.common.tiny_model")
    parser.add_argument("--child", nargs=2, metavar=("ORDER", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child, args.smoke)

    sys.path.insert(0, str(ROOT))
    from bench.common import OUT, emit, loadavg

    kinds = SMOKE if args.smoke else list(itertools.product(ORDERS, THREADS))
    log = OUT / "logs" / "native.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    cases = [c for c in kinds for _ in range(1 if args.smoke else args.reps)]
    load = loadavg()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda c: (c, attempt(*c, args.smoke, log)), cases))
    broken = 0
    for order, threads in kinds:
        codes = [(rc, tail) for (o, t), (rc, tail) in results if (o, t) == (order, threads)]
        signals = [rc for rc, _ in codes if rc < 0]
        failed = [tail for rc, tail in codes if rc > 0]
        broken += len(signals) + len(failed)
        emit("native", load, order=order, threads=threads, tries=len(codes), ok=sum(rc == 0 for rc, _ in codes),
             crashes=len(signals), signals=sorted(set(signals)), other_failures=len(failed),
             stderr_tail=([t for rc, t in codes if rc < 0] or failed or [""])[0][-400:], smoke=args.smoke)
    sys.exit(1 if broken else 0)


if __name__ == "__main__":
    main()
