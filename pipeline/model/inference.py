"""Inference-only passes (no gradients) through the fastest engine on this machine: the backbone features that
tune and train cache, evaluate's forward passes (clean and attacked images), predict and serving.

``inference.engine`` in params.yaml: ``openvino`` runs the Keras model converted in memory (traced once to a
TensorFlow graph) on OpenVINO's CPU runtime, faster than TensorFlow's compiled path in float32 with the same labels
(bench/README.md#inference-engines-and-precision); ``tensorflow`` runs the compiled TensorFlow function; ``auto``
takes TensorFlow when it sees a GPU and OpenVINO otherwise. Gradients (attacks, training) always run in TensorFlow.
``inference.precision``: ``f32`` (the default), ``bf16`` (where the CPU computes it natively, AVX512-BF16 or AMX),
``auto``, OpenVINO's own pick for this CPU (bfloat16 where native), or ``checked``: bfloat16 for a labelled pass
(evaluate's, predict's) only where its labels agree with float32 on ``inference.agreement`` of a seeded sample of
``inference.check_images`` images of that very pass, float32 otherwise, and the decision said
(:func:`checked_probabilities`). bfloat16 keeps the clean labels of the trained models, but attacked images sit
near the boundary, where it can flip labels (bench/README.md#precision), which is why it
is checked pass by pass rather than trusted. Unlabelled passes (backbone features, Square's queries) stay float32
under ``checked``.

Beside the engines, the compiled TensorFlow pass itself (:func:`forward_fn`, run batch by batch by :func:`batched`)
and :func:`predict_proba` on it; runners and compiled passes are built once per model
(:mod:`pipeline.model.derived`).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import weakref
from collections.abc import Iterator

import keras
import numpy as np

from pipeline import config
from pipeline.model.derived import derived
from pipeline.model.twin import compute_twin

log = logging.getLogger(__name__)
AUTO = config.Inference()  # the default: OpenVINO on a CPU, TensorFlow on a GPU


def resolve(cfg: config.Inference) -> str:
    """The engine ``cfg.engine`` names, with ``auto`` decided: TensorFlow on a GPU, OpenVINO on a CPU."""
    if cfg.engine != "auto":
        return cfg.engine
    import tensorflow as tf

    return "tensorflow" if tf.config.list_physical_devices("GPU") else "openvino"


def precision(cfg: config.Inference) -> str:
    """OpenVINO's inference precision under ``cfg``: ``auto`` decided by asking OpenVINO what it picks on this CPU
    (``bf16`` where the CPU has native bfloat16, ``f32`` otherwise); ``checked`` runs a pass it does not check in
    ``f32``."""
    return {"auto": _cpu_precision(), "checked": "f32"}.get(cfg.precision, cfg.precision)


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (OpenVINO's own pick here is bf16): elsewhere a bf16 setting
    computes in float32 and saves nothing."""
    return _cpu_precision() == "bf16"


@functools.cache
def _cpu_precision() -> str:
    return _openvino().Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()


def _openvino():
    try:
        import openvino
    except ImportError:
        from pipeline.errors import ConfigError

        raise ConfigError("inference.engine: openvino is not installed (pip install -r requirements.txt), "
                          "or set inference.engine: tensorflow") from None
    return openvino


def describe(cfg: config.Inference) -> str:
    """What features and predictions depend on: the engine that computes them and its precision."""
    engine = resolve(cfg)
    return f"{engine}-{precision(cfg)}" if engine == "openvino" else engine


def engine_version(cfg: config.Inference) -> str:
    """The OpenVINO runtime's version when it computes (TensorFlow's is recorded wherever its output is)."""
    return _openvino().get_version() if resolve(cfg) == "openvino" else ""


class Runner:
    """A Keras model as a function of a whole array of images (uint8, or floats in [0, 1]), batch by batch."""

    def __call__(self, x: np.ndarray, batch_size: int, progress: str | None = None) -> np.ndarray:
        raise NotImplementedError


class TensorFlowRunner(Runner):
    def __init__(self, model: keras.Model):
        self.fn = forward_fn(model)

    def __call__(self, x, batch_size, progress=None):
        return batched(self.fn, x, batch_size, progress)


@contextlib.contextmanager
def _no_telemetry() -> Iterator[None]:
    # OpenVINO's converter reports usage to Intel unless it believes it runs in CI: a pipeline run should not
    # phone home, and this is the switch it offers (a user who exports CI keeps their value).
    saved = os.environ.get("CI")
    os.environ["CI"] = "true"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CI", None)
        else:
            os.environ["CI"] = saved


class OpenVinoRunner(Runner):
    """The model's compiled TensorFlow graph converted to OpenVINO (dynamic batch), compiled for the CPU with the
    throughput hint and fed through as many asynchronous requests as it has streams, so each always has a batch."""

    def __init__(self, model: keras.Model, precision: str = "f32"):
        import tensorflow as tf

        ov = _openvino()

        graph = forward_fn(model).get_concrete_function(tf.TensorSpec((None, *model.input_shape[1:]), tf.float32))
        with _no_telemetry():
            converted = ov.convert_model(graph)
        self.compiled = ov.Core().compile_model(converted, "CPU", {
            "PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": precision})
        self.output_tail = tuple(model.output_shape[1:])
        self.requests = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))

    def __call__(self, x, batch_size, progress=None):
        from tqdm import tqdm

        out = np.empty((len(x), *self.output_tail), np.float32)
        # Requests are waited on and read here, in the calling thread: a Python callback run on OpenVINO's stream
        # threads needs the GIL, and the process deadlocks at exit when one still holds a reference to it.
        requests = [self.compiled.create_infer_request() for _ in range(self.requests)]
        pending: list[int | None] = [None] * len(requests)

        def collect(k: int) -> None:
            if pending[k] is not None:
                requests[k].wait()
                start = pending[k]
                out[start : start + batch_size] = requests[k].get_output_tensor(0).data
                pending[k] = None

        starts = range(0, len(x), batch_size)
        for n, start in enumerate(tqdm(starts, desc=progress, unit="batch", leave=False) if progress else starts):
            k = n % len(requests)
            collect(k)
            requests[k].start_async({0: to_unit(x[start : start + batch_size])})
            pending[k] = start
        for k in range(len(requests)):
            collect(k)
        return out


def runner(model: keras.Model, cfg: config.Inference) -> Runner:
    """The inference function of ``model`` under ``cfg``, built once per model and setting (conversion and tracing
    cost more than a batch)."""
    key = describe(cfg)

    def build() -> Runner:
        log.info("inference: %s runs %s", key, model.name)
        return OpenVinoRunner(model, precision(cfg)) if resolve(cfg) == "openvino" else TensorFlowRunner(model)

    return derived(model, ("runner", key), build)


def probabilities(model: keras.Model, x: np.ndarray, cfg: config.Inference, batch_size: int = 256,
                  progress: str | None = None) -> np.ndarray:
    """P(FAKE) for uint8 or [0, 1] float images."""
    return runner(model, cfg)(x, batch_size, progress)[:, 0]


def checked_probabilities(model: keras.Model, x: np.ndarray, cfg: config.Inference, threshold: float, seed: int,
                          batch_size: int = 256, progress: str | None = None) -> tuple[np.ndarray, str]:
    """P(FAKE) of a labelled pass, and the precision it ran in with the reason. Under ``precision: checked`` on a
    CPU with native bfloat16 and more images than ``cfg.check_images``: bf16, where its labels at ``threshold``
    agree with float32's on at least ``cfg.agreement`` of a seeded sample of the pass's own images; float32 where
    they do not (with a warning) and wherever the check cannot pay. Any other precision runs as it says."""
    if cfg.precision != "checked":
        return probabilities(model, x, cfg, batch_size, progress), describe(cfg)
    f32 = cfg.model_copy(update={"precision": "f32"})

    def in_f32(why: str) -> tuple[np.ndarray, str]:
        return probabilities(model, x, f32, batch_size, progress), f"f32: {why}"

    if resolve(cfg) != "openvino":
        return in_f32("the tensorflow engine runs float32 only")
    if not native_bf16():
        return in_f32("this CPU has no native bfloat16")
    n = cfg.check_images
    if len(x) <= n:  # checking would cost the whole pass in float32 anyway
        return in_f32(f"{len(x)} images, no more than the {n} of the check")
    sample = np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))
    p_f32 = probabilities(model, x[sample], f32, batch_size)
    p_bf16 = probabilities(model, x, cfg.model_copy(update={"precision": "bf16"}), batch_size, progress)
    agree = float(((p_bf16[sample] >= threshold) == (p_f32 >= threshold)).mean())
    if agree >= cfg.agreement:
        return p_bf16, f"bf16: labels agree with f32 on {agree:.2%} of {n} images"
    log.warning("inference: bf16 labels agreed with f32 on %.2f%% of %d images, below inference.agreement "
                "%.2f%%: this pass runs in f32", 100 * agree, n, 100 * cfg.agreement)
    return in_f32(f"bf16 labels agreed on {agree:.2%} of {n} images, below {cfg.agreement:.2%}")


# The compiled TensorFlow forward pass, batch by batch: the engine `tensorflow` and every gradient-free pass that
# must stay in TensorFlow (validation inside a training loop).
def to_unit(x: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1]; float input is taken to be in [0, 1] already."""
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32, copy=False)


def forward_fn(model: keras.Model):
    """``model`` (its :func:`compute_twin`) as a compiled inference function with a fixed signature, so no batch
    size re-traces it.

    A compiled tf.function is much faster than ``model.predict`` on CPU
    (bench/README.md#inference-engines-and-precision). Built once per model and reused: tracing takes a while, and
    advtrain scores validation after every epoch.
    """
    def build():
        import tensorflow as tf

        spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
        twin = compute_twin(model)
        # Through a weak reference where the twin is the model itself, which must not keep its own entry alive.
        call = weakref.ref(twin) if twin is model else lambda: twin
        fn = tf.function(lambda x: call()(x, training=False), input_signature=[spec])
        fn.output_tail = tuple(model.output_shape[1:])  # oneDNN rejects empty batches, so those never reach fn
        return fn

    return derived(model, "forward", build)


def batched(fn, x: np.ndarray, batch_size: int, progress: str | None = None) -> np.ndarray:
    """Apply a compiled ``fn`` to ``x`` (uint8 or [0, 1] float, possibly a memmap) batch by batch."""
    from tqdm import tqdm

    if len(x) == 0:
        return np.zeros((0, *fn.output_tail), np.float32)
    out = None  # filled in place, sized by the first batch: no list of batches + concatenate copy
    starts = range(0, len(x), batch_size)
    if progress:
        starts = tqdm(starts, desc=progress, unit="batch", leave=False)
    for i in starts:
        batch = np.asarray(fn(to_unit(x[i : i + batch_size])))
        if out is None:
            out = np.empty((len(x), *batch.shape[1:]), np.float32)
        out[i : i + batch_size] = batch
    return out


def predict_proba(model: keras.Model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """P(FAKE) for uint8 or [0, 1] float images, batched through a compiled forward pass."""
    return batched(forward_fn(model), x, batch_size)[:, 0]
