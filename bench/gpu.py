"""The project's exact classifier on a GPU, through Keras 3's JAX backend: what a GPU buys per stage.

    # on the lent GPU machine (no TensorFlow there; keras/pydantic/optree carried as wheels in .whl/):
    KERAS_BACKEND=jax PYTHONPATH=/tmp/site:. python3 bench/gpu.py --out $OUT/gpu.jsonl
    # here, on the CPU, to test the script itself (jax installed apart, e.g. pip install --target /tmp/jaxsite jax):
    KERAS_BACKEND=jax PYTHONPATH=/tmp/jaxsite:. python bench/gpu.py --cpu --small --batches 64,128 \
        --fgsm-batches 32,64 --train-batches 16,32 --images 256 --fgsm-images 128 --train-images 64 --passes 2

The model is ``pipeline.model.build_model`` itself (PixelPreprocess, ResNet50 with ``weights: none``, the head,
the sigmoid): the same layers and FLOPs (~0.16 GFLOP per 32x32 image forward) as the TensorFlow pipeline, run by XLA
on JAX. Each figure is one jitted function of the model's stateless call (weights passed as arguments, not baked in
as constants), compiled ahead of time (``lower().compile()``, timed apart), one warm-up pass, then the median of
timed passes over device-resident, seeded random images (uint8 -> float32 in [0, 1]), each pass ended by
``block_until_ready``. Host-to-device copies are not timed there: the figures are the device's; ``infer_full``
adds ``host_images_per_s``, uint8 batches from the host through ``to_unit`` to P(FAKE) back on the host, as
``pipeline.model.batched`` feeds a model.

Figures, per precision (float32, mixed_float16, mixed_bfloat16):

* ``infer_full``: pixels -> P(FAKE), batch 256 and 1024 (what evaluate/predict run);
* ``infer_features``: pixels -> pooled 2048 features (``feature_extractor``: the feature cache);
* ``fgsm``: one FGSM step, the input gradient of the logit margin sum((1 - 2y) * logit) through
  ``logits_model`` (what ``pipeline.attacks`` differentiates), eps 8/255;
* ``train``: one full training step with the whole backbone trainable (``model.trainable_from=conv1_conv``, its
  BatchNormalization frozen as in the pipeline), binary cross-entropy on P(FAKE) + the head's L2, Adam
  (``advtrain.learning_rate``), via ``model.stateless_call`` + ``optimizer.stateless_apply`` (Keras's "training
  loop from scratch in JAX"), batch 128 and 256. Like ``pipeline.training``'s advtrain loop, no loss scaling;
* ``agreement``: P(FAKE) of the mixed-precision model (same weights, copied) against float32 on the same images:
  max/mean |dP| and the label agreement at the median of the float32 P(FAKE).

One JSON line per figure on stdout (and in ``--out``, or ``$OUT/gpu.jsonl`` when OUT is set), progress on stderr.
Work runs in priority tiers (float32/float16 inference and agreement first, bfloat16 last); a task whose estimated
cost no longer fits ``--budget-s`` is skipped (a ``skipped`` line says so), timed passes stop at the deadline, and a
watchdog ends the process ``--grace-s`` after it whatever is running (everything already measured is on disk).
A persistent XLA compilation cache (``--cache-dir``) makes a rerun on the same machine compile in seconds.
"""
from __future__ import annotations

import time

T0 = time.monotonic()  # the budget counts imports and model builds too

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, Python puts bench/ first on sys.path: its modules (features.py, sample.py, ...)
# must not shadow real packages. The repository root goes there instead, for ``pipeline``.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
FWD_GFLOP = 0.158  # per 32x32 image, the pipeline's own count (the XLA count is reported beside it)
EPS = 8.0 / 255.0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (testing); without it a GPU is required")
    ap.add_argument("--small", action="store_true", help="few images and steps: a quick end-to-end check")
    ap.add_argument("--budget-s", type=float, default=200.0,
                    help="seconds from start (imports and compiles included) after which no task starts")
    ap.add_argument("--grace-s", type=float, default=30.0, help="watchdog: hard exit this long after the budget")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--batches", default="256,1024", help="inference batch sizes (features, full model)")
    ap.add_argument("--fgsm-batches", default="256,1024")
    ap.add_argument("--train-batches", default="128,256")
    ap.add_argument("--kinds", default="infer_full,agreement,infer_features,fgsm,train")
    ap.add_argument("--max-tier", type=int, default=9, help="run tiers 0..N only (0: f32/f16 inference)")
    ap.add_argument("--images", type=int, default=None, help="images per timed inference pass (16384; small 1024)")
    ap.add_argument("--fgsm-images", type=int, default=None, help="images per timed FGSM pass (8192; small 512)")
    ap.add_argument("--train-images", type=int, default=None, help="images per timed training pass (8192; small 512)")
    ap.add_argument("--agree-images", type=int, default=None, help="images for the agreement check (8192; small 1024)")
    ap.add_argument("--passes", type=int, default=None, help="timed passes (median taken; 5, small 3)")
    ap.add_argument("--compile-workers", type=int, default=1,
                    help="compile a tier's functions in this many threads before measuring it (1: one at a time)")
    ap.add_argument("--matmul-precision", default=None, choices=["default", "high", "highest"],
                    help="jax_default_matmul_precision (unset: JAX's default, TF32 for float32 convs on NVIDIA "
                         "GPUs, as TensorFlow does)")
    ap.add_argument("--cache-dir", default="/tmp/cifake-jax-cache", help="persistent XLA cache ('' for none)")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default=None, help="JSON lines file (default: $OUT/gpu.jsonl when OUT is set)")
    ap.add_argument("--plan", action="store_true", help="print the task plan and exit (no model is built)")
    a = ap.parse_args(argv)
    small = a.small
    a.images = a.images or (1024 if small else 16384)
    a.fgsm_images = a.fgsm_images or (512 if small else 8192)
    a.train_images = a.train_images or (512 if small else 8192)
    a.agree_images = a.agree_images or (1024 if small else 8192)
    a.passes = a.passes or (3 if small else 5)
    a.precisions = [p.strip() for p in a.precisions.split(",") if p.strip()]
    bad = [p for p in a.precisions if p not in PRECISIONS]
    if bad:
        ap.error(f"--precisions: unknown {bad}; choose from {PRECISIONS}")
    a.kinds = {k.strip() for k in a.kinds.split(",") if k.strip()}
    for name in ("batches", "fgsm_batches", "train_batches"):
        setattr(a, name, [int(b) for b in getattr(a, name).split(",") if b.strip()])
    if a.out is None and os.environ.get("OUT"):
        a.out = str(Path(os.environ["OUT"]) / "gpu.jsonl")
    return a


ARGS = parse_args()
if ARGS.cpu:
    os.environ["JAX_PLATFORMS"] = "cpu"
if os.environ.get("KERAS_BACKEND", "jax") != "jax":
    print(f"# KERAS_BACKEND={os.environ['KERAS_BACKEND']} ignored: this bench runs Keras on JAX", file=sys.stderr)
os.environ["KERAS_BACKEND"] = "jax"
# keras.utils.set_random_seed (build_model calls it) imports TensorFlow when it can, only to seed it too. The GPU
# machine has none; here, blocking it keeps a CPU run the same as there (and TensorFlow's start-up out of it).
if os.environ.get("BENCH_ALLOW_TF") != "1":
    sys.modules.setdefault("tensorflow", None)  # `import tensorflow` now raises ImportError
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def elapsed() -> float:
    return time.monotonic() - T0


def log(msg: str) -> None:
    print(f"[{elapsed():7.1f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- plan (no jax needed)
class Task:
    def __init__(self, kind: str, precision: str, batch: int | None, tier: int):
        self.kind, self.precision, self.batch, self.tier = kind, precision, batch, tier
        self.compiled = None  # (compiled, state, lower_s, compile_s, flops) once precompiled

    @property
    def key(self):
        return (self.kind, self.precision, self.batch)

    def __repr__(self):
        return f"{self.kind}/{self.precision}" + (f"/b{self.batch}" if self.batch else "")


def plan(a) -> list[Task]:
    main = [p for p in a.precisions if p != "mixed_bfloat16"]
    tasks: list[Task] = []
    mixed = [p for p in a.precisions if p != "float32"]
    b_agree = max(a.batches) if a.batches else None
    for prec in a.precisions:
        late = prec not in main  # bfloat16: after everything float32/float16
        t = (lambda tier: tier + 3) if late else (lambda tier: tier)
        if "infer_full" in a.kinds:
            for b in a.batches:
                tasks.append(Task("infer_full", prec, b, t(0) if not late or b == b_agree else t(1)))
        if "agreement" in a.kinds and prec in mixed and "float32" in a.precisions and b_agree:
            tasks.append(Task("agreement", prec, b_agree, t(0)))
        if "infer_features" in a.kinds:
            for b in a.batches:
                tasks.append(Task("infer_features", prec, b, t(0) if b == max(a.batches) else t(2)))
        if "fgsm" in a.kinds:
            for i, b in enumerate(a.fgsm_batches):
                tasks.append(Task("fgsm", prec, b, t(1) if i == 0 else t(2)))
        if "train" in a.kinds:
            for i, b in enumerate(a.train_batches):
                tasks.append(Task("train", prec, b, t(1) if i == 0 else t(2)))
    tasks = [t for t in tasks if t.tier <= a.max_tier]
    order = {p: i for i, p in enumerate(PRECISIONS)}
    kind_order = {"infer_full": 0, "agreement": 1, "infer_features": 2, "fgsm": 3, "train": 4}
    # Within a tier: float32 first, then by kind; agreement needs both precisions' infer_full first.
    tasks.sort(key=lambda t: (t.tier, kind_order[t.kind] if t.kind != "agreement" else 9, order[t.precision],
                              t.batch or 0))
    return tasks


if ARGS.plan:
    for t in plan(ARGS):
        print(f"tier {t.tier}: {t}")
    sys.exit(0)

# ---------------------------------------------------------------- imports
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

if ARGS.cache_dir:
    try:
        jax.config.update("jax_compilation_cache_dir", ARGS.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    except Exception as err:  # an older/newer jax without these options: no cache, same figures
        print(f"# no persistent compilation cache: {err}", file=sys.stderr)

if ARGS.matmul_precision:
    jax.config.update("jax_default_matmul_precision", ARGS.matmul_precision)

import keras  # noqa: E402

from pipeline import config  # noqa: E402
from pipeline.model import build_model, feature_extractor, logits_model, to_unit  # noqa: E402

TF_IMPORTED = sys.modules.get("tensorflow") is not None
BACKEND = jax.default_backend()
if keras.backend.backend() != "jax":
    sys.exit(f"keras backend is {keras.backend.backend()}, not jax")
if BACKEND != "gpu" and not ARGS.cpu:
    sys.exit(f"jax backend is {BACKEND!r}, not gpu: pass --cpu to run on the CPU ({jax.devices()})")
DEV = jax.devices()[0]


def _version(mod: str):
    try:
        from importlib import metadata
        return metadata.version(mod)
    except Exception:
        return None


ENV = {
    "device": getattr(DEV, "device_kind", str(DEV)),
    "platform": DEV.platform,
    "n_devices": len(jax.devices()),
    "jax": jax.__version__,
    "jaxlib": _version("jaxlib"),
    "keras": keras.__version__,
    "numpy": np.__version__,
    "python": platform.python_version(),
    "host_cpus": os.cpu_count(),
    "tensorflow_imported": TF_IMPORTED,
    "matmul_precision": ARGS.matmul_precision or "jax default",
    "small": ARGS.small,
}

_out = None
if ARGS.out:
    Path(ARGS.out).parent.mkdir(parents=True, exist_ok=True)
    _out = open(ARGS.out, "w")
_emit_lock = threading.Lock()
RESULTS: list[dict] = []


def emit(kind: str, **fields) -> dict:
    rec = {"bench": "gpu", "kind": kind, **fields, **ENV,
           "ts": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "t_s": round(elapsed(), 2)}
    line = json.dumps(rec, default=float)
    with _emit_lock:
        RESULTS.append(rec)
        print(line, flush=True)
        if _out:
            _out.write(line + "\n")
            _out.flush()
            os.fsync(_out.fileno())
    return rec


def measured() -> dict:
    return {f"{r['kind']}/{r['precision']}/b{r['batch']}": r["images_per_s"] for r in RESULTS if "images_per_s" in r}


def _watchdog():
    emit("aborted", reason=f"hard limit: budget {ARGS.budget_s:g} s + grace {ARGS.grace_s:g} s reached",
         images_per_s=measured())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(3)


_dog = threading.Timer(max(1.0, ARGS.budget_s + ARGS.grace_s - elapsed()), _watchdog)
_dog.daemon = True
_dog.start()
DEADLINE = T0 + ARGS.budget_s

# ---------------------------------------------------------------- models, data
_models: dict = {}
BUILD_TIME = [0.0]  # seconds spent building models, kept out of the lowering times


def model_for(precision: str, train: bool) -> keras.Model:
    key = (precision, train)
    if key not in _models:
        t = time.monotonic()
        p = config.load(ARGS.params, [f"model.precision={precision}",
                                      "model.trainable_from=" + ("conv1_conv" if train else "null")])
        m = build_model(p.model, dropout=0.0, seed=ARGS.seed)
        if not train and precision != "float32" and "float32" in ARGS.precisions:
            # the same weights as the float32 model (same seed already; copying makes the agreement exact)
            m.set_weights(model_for("float32", False).get_weights())
        _models[key] = m
        _models[key, "lr"] = getattr(getattr(p, "advtrain", None), "learning_rate", 1e-4)
        BUILD_TIME[0] += time.monotonic() - t
        n_tr = sum(int(np.prod(v.shape)) for v in m.trainable_variables)
        n_all = sum(int(np.prod(v.shape)) for v in m.weights)
        log(f"built {precision} {'trainable' if train else 'frozen'} model: {n_all:,} weights, {n_tr:,} trainable, "
            f"policy {m.get_layer('preprocess').dtype_policy.name}, {time.monotonic() - t:.1f}s")
    return _models[key]


def derived(precision: str, what: str) -> keras.Model:
    key = (precision, what)
    if key not in _models:
        base = model_for(precision, False)
        _models[key] = feature_extractor(base) if what == "features" else logits_model(base)
    return _models[key]


rng = np.random.default_rng(ARGS.seed)
N_DATA = max(ARGS.images, ARGS.fgsm_images, ARGS.train_images, ARGS.agree_images,
             *(ARGS.batches or [0]), *(ARGS.fgsm_batches or [0]), *(ARGS.train_batches or [0]))
X_U8 = rng.integers(0, 256, (N_DATA, 32, 32, 3), dtype=np.uint8)
X_HOST = to_unit(X_U8)
Y_HOST = rng.integers(0, 2, (N_DATA, 1)).astype(np.float32)
_batches: dict = {}


def batches(b: int, n: int, labels: bool = False) -> list:
    """``n // b`` device-resident batches of ``b`` images (at least one), sliced on the host: slicing a device
    array eagerly compiles one small program per distinct slice."""
    key = (b, n, labels)
    if key not in _batches:
        k = max(1, n // b)
        xs = jax.device_put([X_HOST[i * b:(i + 1) * b] for i in range(k)], DEV)
        ys = jax.device_put([Y_HOST[i * b:(i + 1) * b] for i in range(k)], DEV)
        jax.block_until_ready(xs + ys)
        _batches[key] = list(zip(xs, ys)) if labels else xs
    return _batches[key]


def values(vs) -> list:
    return [v.value for v in vs]


def copies(vs) -> list:
    return [jnp.array(v.value, copy=True) for v in vs]  # donated buffers must not be the model's own


# ---------------------------------------------------------------- the jitted functions
def build_fn(task: Task):
    """(python function, example args, donate_argnums, runner data) for ``task``."""
    b = task.batch
    if task.kind in ("infer_full", "infer_features", "agreement"):
        m = model_for(task.precision, False) if task.kind != "infer_features" else derived(task.precision, "features")

        def fwd(tv, ntv, x):
            return m.stateless_call(tv, ntv, x, training=False)[0]

        state = (values(m.trainable_variables), values(m.non_trainable_variables))
        return fwd, (*state, batches(b, b)[0]), (), state
    if task.kind == "fgsm":
        lm = derived(task.precision, "logits")

        def fgsm(tv, ntv, x, y):
            def margin(x):
                z = lm.stateless_call(tv, ntv, x, training=False)[0]
                return jnp.sum((1.0 - 2.0 * y) * z.astype(jnp.float32))

            g = jax.grad(margin)(x)
            return jnp.clip(x + EPS * jnp.sign(g), 0.0, 1.0)

        state = (values(lm.trainable_variables), values(lm.non_trainable_variables))
        return fgsm, (*state, *batches(b, b, True)[0]), (), state
    if task.kind == "train":
        m = model_for(task.precision, True)
        opt = keras.optimizers.Adam(_models[(task.precision, True), "lr"])
        opt.build(m.trainable_variables)
        bce = keras.losses.BinaryCrossentropy()

        def loss_fn(tv, ntv, x, y):
            p, ntv, losses = m.stateless_call(tv, ntv, x, training=True, return_losses=True)
            loss = bce(y, p)
            if losses:
                loss = loss + sum(losses)
            return loss, ntv

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def step(state, x, y):
            tv, ntv, ov = state
            (loss, ntv), grads = grad_fn(tv, ntv, x, y)
            tv, ov = opt.stateless_apply(ov, grads, tv)
            return loss, (tv, ntv, ov)

        state = (copies(m.trainable_variables), copies(m.non_trainable_variables), copies(opt.variables))
        donate = (0,) if BACKEND == "gpu" else ()
        return step, (state, *batches(b, b, True)[0]), donate, state
    raise ValueError(task.kind)


def lower_task(task: Task):
    t, built = time.monotonic(), BUILD_TIME[0]
    fn, example, donate, state = build_fn(task)
    lowered = jax.jit(fn, donate_argnums=donate).lower(*example)
    return lowered, state, time.monotonic() - t - (BUILD_TIME[0] - built)


def compile_lowered(lowered):
    t = time.monotonic()
    compiled = lowered.compile()
    compile_s = time.monotonic() - t
    flops = None
    for ca in (compiled, lowered):
        try:
            c = ca.cost_analysis()
            c = c[0] if isinstance(c, (list, tuple)) else c
            if c and c.get("flops"):
                flops = float(c["flops"])
                break
        except Exception:
            pass
    return compiled, compile_s, flops


# ---------------------------------------------------------------- timing
def timed_passes(run_pass, images_per_pass: int, passes: int) -> dict:
    t = time.monotonic()
    run_pass()  # warm-up (first execution, allocator)
    warm_s = time.monotonic() - t
    times = []
    for _ in range(passes):
        if times and time.monotonic() + min(times) > DEADLINE:
            break
        t = time.monotonic()
        run_pass()
        times.append(time.monotonic() - t)
    ips = [images_per_pass / s for s in times]
    return {"images_per_s": round(statistics.median(ips), 1), "images_per_s_min": round(min(ips), 1),
            "images_per_s_max": round(max(ips), 1), "pass_s": [round(s, 4) for s in times],
            "passes": len(times), "images_per_pass": images_per_pass, "warmup_s": round(warm_s, 3)}


_infer_fns: dict = {}  # (precision, batch) -> (compiled, state): infer_full, reused by the agreement check


def measure(task: Task, compiled, state, lower_s, compile_s, flops) -> None:
    b = task.batch
    common = {"precision": task.precision, "batch": b, "lower_s": round(lower_s, 2), "compile_s": round(compile_s, 2)}
    per_image_factor = {"infer_full": 1, "infer_features": 1, "fgsm": 2, "train": 3}.get(task.kind, 1)
    if flops:
        common["xla_gflop_per_image"] = round(flops / b / 1e9, 4)
    if task.kind == "agreement":
        return agreement(task)
    if task.kind in ("infer_full", "infer_features"):
        tv, ntv = state
        xs = batches(b, ARGS.images)

        def run_pass():
            jax.block_until_ready([compiled(tv, ntv, x) for x in xs])

        r = timed_passes(run_pass, len(xs) * b, ARGS.passes)
        # float32 before any statistic: numpy sums float16/bfloat16 in their own dtype (overflow, stalled sums)
        out = np.asarray(compiled(tv, ntv, xs[0])).astype(np.float32)
        sanity = {"out_shape": list(out.shape), "out_finite": bool(np.isfinite(out).all()),
                  "out_mean": float(np.mean(out)), "out_std": float(np.std(out))}
        if task.kind == "infer_full":
            _infer_fns[(task.precision, b)] = (compiled, state)
            # As the pipeline feeds it (pipeline.model.batched): uint8 host batches -> to_unit -> P(FAKE) on the host
            k = len(xs)

            def host_pass():
                for i in range(k):
                    np.asarray(compiled(tv, ntv, to_unit(X_U8[i * b:(i + 1) * b])))

            h = timed_passes(host_pass, k * b, min(3, ARGS.passes))
            sanity["host_images_per_s"] = h["images_per_s"]
            sanity["host_pass_s"] = h["pass_s"]
    elif task.kind == "fgsm":
        tv, ntv = state
        xys = batches(b, ARGS.fgsm_images, True)

        def run_pass():
            jax.block_until_ready([compiled(tv, ntv, x, y) for x, y in xys])

        r = timed_passes(run_pass, len(xys) * b, ARGS.passes)
        x0 = np.asarray(xys[0][0])
        adv = np.asarray(compiled(tv, ntv, *xys[0])).astype(np.float32)
        d = adv - x0
        sanity = {"epsilon": round(EPS, 6), "nan_fraction": float(np.mean(~np.isfinite(adv))),
                  "changed_fraction": float(np.mean(np.abs(d) > 1e-7)),
                  "max_abs_change": float(np.nanmax(np.abs(d)))}
    elif task.kind == "train":
        xys = batches(b, ARGS.train_images, True)
        holder = {"state": state, "losses": []}

        def run_pass():
            s = holder["state"]
            losses = []
            for x, y in xys:
                loss, s = compiled(s, x, y)
                losses.append(loss)
            jax.block_until_ready((losses, s))
            holder["state"], holder["losses"] = s, losses

        r = timed_passes(run_pass, len(xys) * b, ARGS.passes)
        ls = [float(v) for v in holder["losses"]]
        sanity = {"steps_per_pass": len(xys), "loss_first": ls[0], "loss_last": ls[-1],
                  "loss_finite": bool(np.isfinite(ls).all()), "n_trainable_tensors": len(state[0])}
        holder["state"] = None
    else:
        raise ValueError(task.kind)
    rec = {**common, **r, **sanity}
    if flops:
        rec["xla_tflop_per_s"] = round(r["images_per_s"] * flops / b / 1e12, 2)
    rec["est_tflop_per_s"] = round(r["images_per_s"] * FWD_GFLOP * per_image_factor / 1e3, 2)
    emit(task.kind, **rec)
    log(f"{task}: {r['images_per_s']:,.0f} img/s (compile {compile_s:.1f}s)")


def predict_all(prec: str, b: int, n: int) -> np.ndarray:
    compiled, (tv, ntv) = _infer_fns[(prec, b)]
    xs = batches(b, n)
    return np.concatenate([np.asarray(compiled(tv, ntv, x)) for x in xs])[:, 0].astype(np.float32)


def agreement(task: Task) -> None:
    b = task.batch
    if ("float32", b) not in _infer_fns or (task.precision, b) not in _infer_fns:
        emit("skipped", task=repr(task), reason="infer_full of float32 or this precision at this batch not measured")
        return
    p32 = predict_all("float32", b, ARGS.agree_images)
    pm = predict_all(task.precision, b, ARGS.agree_images)
    thr = float(np.median(p32))
    d = np.abs(pm.astype(np.float64) - p32)

    def logit(p):  # from float32 P: P is tiny for a random head, so |dP| alone says little
        p = np.clip(p.astype(np.float64), 1e-38, 1 - 1e-7)
        return np.log(p) - np.log1p(-p)

    dz = np.abs(logit(pm) - logit(p32))
    emit("agreement", precision=task.precision, reference="float32", batch=b, images=int(len(p32)),
         max_abs_dp=float(np.nanmax(d)) if np.isfinite(d).any() else None, mean_abs_dp=float(np.nanmean(d)),
         nan_count=int(np.sum(~np.isfinite(pm))), threshold=thr,
         max_abs_dlogit=float(np.nanmax(dz)), mean_abs_dlogit=float(np.nanmean(dz)),
         label_agreement=float(np.mean((p32 >= thr) == (pm >= thr))),
         p32_quantiles={q: float(np.quantile(p32, q)) for q in (0.0, 0.01, 0.5, 0.99, 1.0)},
         p32_std=float(np.std(p32)))
    log(f"{task}: max |dP| {float(np.nanmax(d)):.2e}, label agreement {np.mean((p32 >= thr) == (pm >= thr)):.4f}")


# ---------------------------------------------------------------- scheduling under the budget
# Guesses for the first task of each kind (seconds: lowering, XLA compile incl. autotuning, measuring); replaced by
# what was seen once a task of that kind ran. A model build adds BUILD_S the first time.
EST = {"infer_full": [4, 15, 4], "infer_features": [3, 15, 4], "fgsm": [6, 30, 4], "train": [10, 50, 6],
       "agreement": [0, 0, 2]}
# Until a kind has run, its lowering and compile times are guessed from infer_full's where that has run (CPU here:
# fgsm compiles ~5x, a training step ~10x longer than inference).
SCALE = {"infer_features": 1.0, "fgsm": 4.0, "train": 8.0, "agreement": 0.0}
BUILD_S = 6.0
SEEN: dict = {}


def estimate(task: Task) -> float:
    if task.kind in SEEN:
        low, comp, run = SEEN[task.kind]
    elif "infer_full" in SEEN:
        f = SCALE[task.kind]
        low, comp, run = SEEN["infer_full"][0] * f, SEEN["infer_full"][1] * f, EST[task.kind][2]
    else:
        low, comp, run = EST[task.kind]
    need = 0.0
    if task.kind == "train" and (task.precision, True) not in _models:
        need += BUILD_S
    elif task.kind != "train" and (task.precision, False) not in _models:
        need += BUILD_S * (2 if task.precision != "float32" and ("float32", False) not in _models else 1)
    return need + low + comp + run


def run_task(task: Task) -> None:
    if task.kind == "agreement":
        agreement(task)
        return
    if task.compiled is None:
        log(f"{task}: lowering")
        lowered, state, lower_s = lower_task(task)
        log(f"{task}: compiling (lowered in {lower_s:.1f}s)")
        compiled, compile_s, flops = compile_lowered(lowered)
    else:
        compiled, state, lower_s, compile_s, flops = task.compiled
        task.compiled = None
    t_run = time.monotonic()
    measure(task, compiled, state, lower_s, compile_s, flops)
    run_s = time.monotonic() - t_run
    old = SEEN.get(task.kind)
    SEEN[task.kind] = [max(lower_s, old[0]) if old else lower_s, max(compile_s, old[1]) if old else compile_s,
                       max(run_s, old[2]) if old else run_s]


def precompile(tier_tasks: list[Task], workers: int) -> None:
    """Lower each task here (Keras tracing is Python), compile them in ``workers`` threads (XLA releases the GIL)."""
    pool = ThreadPoolExecutor(workers)
    futs = []
    for task in tier_tasks:
        if task.kind == "agreement" or time.monotonic() + estimate(task) > DEADLINE:
            continue
        log(f"{task}: lowering (precompile)")
        lowered, state, lower_s = lower_task(task)
        futs.append((task, state, lower_s, pool.submit(compile_lowered, lowered)))
    for task, state, lower_s, fut in futs:
        try:
            compiled, compile_s, flops = fut.result(timeout=max(1.0, DEADLINE - time.monotonic()))
        except Exception as err:  # timeout or compile error: the task compiles itself later if it still fits
            log(f"{task}: precompile failed: {type(err).__name__}: {err}")
            continue
        task.compiled = (compiled, state, lower_s, compile_s, flops)
        log(f"{task}: compiled in {compile_s:.1f}s")
    pool.shutdown(wait=False, cancel_futures=True)


def main() -> int:
    tasks = plan(ARGS)
    emit("env", tasks=[repr(t) for t in tasks], budget_s=ARGS.budget_s, argv=sys.argv[1:],
         images=ARGS.images, fgsm_images=ARGS.fgsm_images, train_images=ARGS.train_images,
         agree_images=ARGS.agree_images, passes=ARGS.passes, xla_flags=os.environ.get("XLA_FLAGS"),
         cache_dir=ARGS.cache_dir or None, backend=BACKEND, devices=[str(d) for d in jax.devices()])
    log(f"jax {jax.__version__} on {ENV['device']} ({BACKEND}), keras {keras.__version__}, "
        f"tensorflow imported: {TF_IMPORTED}; {len(tasks)} tasks, budget {ARGS.budget_s:g}s")
    failures = 0
    tiers = sorted({t.tier for t in tasks})
    for tier in tiers:
        tier_tasks = [t for t in tasks if t.tier == tier]
        if ARGS.compile_workers > 1:
            precompile(tier_tasks, ARGS.compile_workers)
        for task in tier_tasks:
            est = 0.0 if task.compiled else estimate(task)
            if time.monotonic() + est > DEADLINE:
                emit("skipped", task=repr(task), tier=tier, reason=f"budget: ~{est:.0f}s needed, "
                     f"{max(0.0, DEADLINE - time.monotonic()):.0f}s left")
                log(f"{task}: skipped (budget)")
                continue
            try:
                run_task(task)
            except Exception as err:  # one failed figure must not lose the others
                failures += 1
                import traceback
                traceback.print_exc()
                emit("error", task=repr(task), error=f"{type(err).__name__}: {err}"[:2000])
    mem = None
    try:
        stats = DEV.memory_stats() or {}
        mem = {k: stats.get(k) for k in ("peak_bytes_in_use", "bytes_limit") if k in stats}
    except Exception:
        pass
    emit("summary", images_per_s=measured(), failures=failures, memory=mem,
         skipped=[r["task"] for r in RESULTS if r["kind"] == "skipped"], total_s=round(elapsed(), 1))
    log(f"done in {elapsed():.1f}s, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    code = main()
    _dog.cancel()
    if _out:
        _out.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # do not wait for compile threads abandoned at the deadline
