"""The classifier: pixels in [0, 1] -> P(FAKE), a ResNet50 backbone and a small head.

The model does its own preprocessing (resize, ResNet50's caffe normalisation), so attacks and users work in pixel
space and what is saved is what is served. Its last layer ``head`` returns the logit and a separate sigmoid turns it
into a probability: attacks differentiate the logit, because the gradient of a saturated sigmoid vanishes.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import keras
import numpy as np
from keras import layers, ops

from pipeline import config
from pipeline.errors import ModelError
from pipeline.io import atomic_path

INPUT_SHAPE = (32, 32, 3)
FEATURE_DIM = 2048  # ResNet50's pooled output
# ResNet50's "caffe" preprocessing: BGR order, ImageNet channel means subtracted, no scaling.
_BGR_MEAN = (103.939, 116.779, 123.68)
IMAGENET_HINT = (
    "download resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 on a machine with internet and set "
    "model.weights to its path, or use model.weights: none"
)


@keras.saving.register_keras_serializable(package="cifake")
class PixelPreprocess(layers.Layer):
    """[0, 1] RGB pixels -> what ResNet50 expects, resized to ``image_size`` (upsampling helps a pretrained net)."""

    def __init__(self, image_size: int = 32, **kwargs):
        super().__init__(**kwargs)
        self.image_size = image_size

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        if self.image_size != INPUT_SHAPE[0]:
            x = ops.image.resize(x, (self.image_size, self.image_size), interpolation="bilinear")
        x = ops.flip(x * 255.0, axis=-1)
        return x - ops.cast(ops.convert_to_tensor(_BGR_MEAN), x.dtype)

    def get_config(self):
        return {**super().get_config(), "image_size": self.image_size}


def set_precision(precision: str) -> None:
    keras.mixed_precision.set_global_policy(precision)


def build_backbone(cfg: config.Model) -> keras.Model:
    """ResNet50 without its top, weights per ``model.weights``, frozen up to ``model.trainable_from``."""
    size = cfg.image_size
    spec = cfg.weights
    weights_file = None if spec in ("imagenet", "none") else Path(spec)
    if weights_file is not None and not weights_file.is_file():
        raise ModelError(f"model.weights: no weights file at {weights_file} (expected imagenet, none, or a path)")
    try:
        backbone = keras.applications.ResNet50(
            include_top=False,
            weights="imagenet" if spec == "imagenet" else None,
            input_shape=(size, size, 3),
        )
    except Exception as err:  # Keras raises a bare Exception("URL fetch failure ...") offline
        raise ModelError(
            f"model.weights: imagenet: could not download the ImageNet weights ({err}); {IMAGENET_HINT}") from None
    if weights_file is not None:
        try:
            backbone.load_weights(weights_file)
        except (ValueError, OSError, KeyError, zipfile.BadZipFile) as err:
            raise ModelError(
                f"model.weights: {weights_file} does not hold ResNet50 backbone weights ({err}); expected a "
                "Keras .weights.h5 saved from keras.applications.ResNet50(include_top=False) or Keras's notop .h5"
            ) from None
    set_trainable(backbone, cfg.trainable_from)
    return backbone


def set_trainable(backbone: keras.Model, trainable_from: str | None) -> None:
    """Freeze everything before ``trainable_from`` (all of it when None).

    BatchNormalization layers stay frozen after it too, as Keras's fine-tuning guide advises: in Keras 3 a frozen
    BN layer runs in inference mode, so a fine-tune on small, attack-heavy batches cannot rewrite the statistics
    that the layers around it were fitted to.
    """
    names = [layer.name for layer in backbone.layers]
    if trainable_from is not None and trainable_from not in names:
        examples = ", ".join(n for n in names if n.endswith("_1_conv"))[:200]
        raise ModelError(f"trainable_from: no ResNet50 layer named {trainable_from!r}; e.g. conv1_conv, {examples}")
    start = len(names) if trainable_from is None else names.index(trainable_from)
    backbone.trainable = True
    for i, layer in enumerate(backbone.layers):
        layer.trainable = i >= start and not isinstance(layer, layers.BatchNormalization)


def build_head(dropout: float, l2: float, seed: int | None = None) -> keras.Model:
    """Pooled features (2048) -> logit. Global average pooling sits just before it in the full model. ``seed``
    fixes the initial weights (None: Keras's global generator)."""
    def init(i: int):
        return "glorot_uniform" if seed is None else keras.initializers.GlorotUniform(seed + i)

    features = keras.Input((FEATURE_DIM,), name="features")
    # momentum 0.9, not Keras's 0.99: a head trains for few steps on small data, and at 0.99 the moving statistics
    # of features far from N(0, 1) (a random backbone's reach ~10) are still half their initial values by then.
    x = layers.BatchNormalization(momentum=0.9, name="head_bn")(features)
    x = layers.Dense(256, activation="relu", kernel_regularizer=keras.regularizers.L2(l2), kernel_initializer=init(0),
                     name="head_dense256")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    x = layers.Dense(64, activation="relu", kernel_initializer=init(1), name="head_dense64")(x)
    logit = layers.Dense(1, dtype="float32", kernel_initializer=init(2), name="logit")(x)
    return keras.Model(features, logit, name="head")


def assemble(backbone: keras.Model, head: keras.Model, image_size: int) -> keras.Model:
    """Pixels -> preprocessing -> backbone -> global average pooling -> head -> sigmoid = P(FAKE)."""
    pixels = keras.Input(INPUT_SHAPE, name="pixels")
    x = PixelPreprocess(image_size, name="preprocess")(pixels)
    x = backbone(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    logit = head(x)
    prob = layers.Activation("sigmoid", dtype="float32", name="prob")(logit)
    return keras.Model(pixels, prob, name="cifake_resnet50")


def build_model(cfg: config.Model, dropout: float, seed: int, head: keras.Model | None = None) -> keras.Model:
    """The full classifier. Seeded right before the backbone is built, so ``weights: none`` gives the same random
    backbone in every stage: the one whose features were cached."""
    set_precision(cfg.precision)
    keras.utils.set_random_seed(seed)
    backbone = build_backbone(cfg)
    return assemble(backbone, head or build_head(dropout, cfg.l2), cfg.image_size)


def feature_extractor(model: keras.Model) -> keras.Model:
    """Pixels -> pooled backbone features: the part of ``model`` a frozen backbone makes constant. Built once per
    model, so the inference engine converts it once for all the splits it extracts."""
    extractor = getattr(model, "_cifake_features", None)
    if extractor is None:
        extractor = keras.Model(model.input, model.get_layer("gap").output, name="features")
        object.__setattr__(model, "_cifake_features", extractor)  # past Keras's tracking, as logits_model
    return extractor


def logits_model(model: keras.Model) -> keras.Model:
    """Pixels -> logit, for attacks and losses that must not pass through a saturating sigmoid: the
    :func:`compute_twin` of that part of ``model``, built once per model."""
    twin = getattr(model, "_cifake_logits", None)
    if twin is None:
        # The sigmoid's input, not the head's output: the head may also have been called on cached features.
        twin = compute_twin(keras.Model(model.input, model.get_layer("prob").input, name="logits"))
        object.__setattr__(model, "_cifake_logits", twin)  # past Keras's tracking: it lives and dies with the model
    return twin


# oneDNN's convolutions crawl on ResNet50's last maps at 32x32 (1x1 and 2x2 pixels), far below its matrix
# products; as matrix products the same sums run faster (bench/README.md#the-compute-twin). A 3x3 kernel on a 4x4
# map as a matrix product was slower than the convolution.
SMALL_MAP_PIXELS = 4


class TwinConv(layers.Layer):
    """A ``Conv2D`` as the compute twin runs it, with the convolution's own variables (shared, not copied): the same
    sums, in another order.

    - ``matmul``: on a map of at most SMALL_MAP_PIXELS output pixels, one matrix product. A 1x1 kernel (any stride)
      multiplies each pixel's channels; a larger one (stride 1, 'same') becomes the matrix that maps the whole small
      map to the whole output map, its entries the kernel's taps that meet a real pixel (the zero padding drops out).
    - ``bn``: the frozen ``BatchNormalization`` that reads only this convolution, folded in, as inference engines
      do: the kernel scaled per filter by gamma / sqrt(variance + epsilon) and the shift added as a bias, so the
      activations are not read and written once more each way. A normalisation that is trainable and called in
      training runs as itself after the convolution (its batch statistics cannot be folded)."""

    def __init__(self, conv: layers.Conv2D, bn: layers.BatchNormalization | None = None, matmul: bool = False,
                 **kwargs):
        name = conv.name + ("_as_matmul" if matmul else "") + ("_bn_folded" if bn is not None else "")
        super().__init__(name=name, dtype=conv.dtype_policy, **kwargs)
        self.conv, self.bn, self.matmul = conv, bn, matmul

    def call(self, x, training=None):
        conv, bn = self.conv, self.bn
        kernel, bias = conv.kernel, conv.bias if conv.use_bias else None
        unfolded = bn is not None and bn.trainable and bool(training)
        if bn is not None and not unfolded:
            scale = ops.rsqrt(bn.moving_variance + bn.epsilon)
            if bn.scale:
                scale = scale * bn.gamma
            kernel = kernel * scale
            shift = -bn.moving_mean * scale if bias is None else (bias - bn.moving_mean) * scale
            bias = shift + bn.beta if bn.center else shift
        kernel = ops.cast(kernel, x.dtype)
        y = self._matmul(x, kernel) if self.matmul else ops.conv(x, kernel, conv.strides, conv.padding)
        if bias is not None:
            y = y + ops.cast(bias, y.dtype)
        y = conv.activation(y) if conv.activation is not None else y
        return bn(y, training=training) if unfolded else y

    def _matmul(self, x, kernel):
        kh, kw, channels, filters = kernel.shape
        if (kh, kw) == (1, 1):
            sh, sw = self.conv.strides
            x = x[:, ::sh, ::sw, :]
            _, h, w, _ = x.shape
            y = ops.matmul(ops.reshape(x, (-1, channels)), kernel[0, 0])
        else:
            _, h, w, _ = x.shape
            taps = np.full((h * w, h * w), kh * kw)  # input pixel x output pixel -> kernel tap (kh*kw: none)
            for p, q, i, j in np.ndindex(h, w, h, w):
                a, b = p - i + (kh - 1) // 2, q - j + (kw - 1) // 2
                if 0 <= a < kh and 0 <= b < kw:
                    taps[p * w + q, i * w + j] = a * kw + b
            flat = ops.concatenate([ops.reshape(kernel, (kh * kw, channels, filters)),
                                    ops.zeros((1, channels, filters), kernel.dtype)], axis=0)
            matrix = ops.reshape(ops.transpose(ops.take(flat, taps, axis=0), (0, 2, 1, 3)),
                                 (h * w * channels, h * w * filters))
            y = ops.matmul(ops.reshape(x, (-1, h * w * channels)), matrix)
        return ops.reshape(y, (-1, h, w, filters))


def _plain_conv(layer) -> bool:
    return type(layer) is layers.Conv2D and layer.data_format == "channels_last" and layer.groups == 1 \
        and tuple(layer.dilation_rate) == (1, 1)


def _small_map_conv(layer, x) -> bool:
    if not _plain_conv(layer) or x.shape[1] is None or x.shape[2] is None:
        return False
    if tuple(layer.kernel_size) == (1, 1):  # a matrix product per output pixel, whatever the stride
        sh, sw = layer.strides
        return -(-x.shape[1] // sh) * -(-x.shape[2] // sw) <= SMALL_MAP_PIXELS
    same = layer.padding == "same" and tuple(layer.strides) == (1, 1)
    return same and x.shape[1] * x.shape[2] <= SMALL_MAP_PIXELS


def _foldable_norms(model: keras.Model) -> dict[str, layers.BatchNormalization]:
    """Conv2D name -> the BatchNormalization (channels last) that is its only reader, where the convolution has no
    activation of its own: the pairs a twin folds."""
    pairs = {}

    def walk(m):
        for layer in m.layers:
            if isinstance(layer, keras.Model):
                walk(layer)
            elif type(layer) is layers.BatchNormalization and layer.axis in (-1, 3) and len(layer._inbound_nodes) == 1:
                parents = layer._inbound_nodes[0].parent_nodes
                conv = parents[0].operation if len(parents) == 1 else None
                if conv is not None and _plain_conv(conv) and len(conv._outbound_nodes) == 1 \
                        and conv.activation in (None, keras.activations.linear):
                    pairs[conv.name] = layer
    walk(model)
    return pairs


def compute_twin(model: keras.Model) -> keras.Model:
    """``model`` for computing (attacks, training, TensorFlow inference): the same layers and variables, so it
    trains ``model`` and follows its weights, with each convolution as a :class:`TwinConv` where that is faster:
    its frozen batch normalisation folded in, and on a small map, a matrix product. Equal to ``model`` up to float
    rounding (the sums run in another order). ``model`` itself when nothing changes (no such convolution, or a
    Sequential or subclassed model). What is saved is always ``model``; OpenVINO converts the twin
    (:func:`forward_fn`). Built once per model: forward passes and training share it."""
    twin = getattr(model, "_cifake_twin", None)
    if twin is None:
        twin = _rewrite_convolutions(model)
        object.__setattr__(model, "_cifake_twin", twin)  # past Keras's tracking, as forward_fn's
    return twin


def _rewrite_convolutions(model: keras.Model) -> keras.Model:
    norms = _foldable_norms(model)
    folded, swapped = set(), []

    def call(layer, *args, **kwargs):
        x = args[0] if args else None
        small = x is not None and _small_map_conv(layer, x)
        bn = norms.get(layer.name) if type(layer) is layers.Conv2D else None
        if small or bn is not None:
            swapped.append(layer.name)
            if bn is not None:
                folded.add(bn.name)
            return TwinConv(layer, bn, small)(x, **kwargs)
        if type(layer) is layers.BatchNormalization and layer.name in folded:  # its convolution computed it
            return x
        return layer(*args, **kwargs)

    try:
        twin = keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call, recursive=True)
    except ValueError:  # a Sequential or subclassed model: no graph to rewrite
        return model
    return twin if swapped else model


def head_classifier(head: keras.Model) -> keras.Model:
    """Features -> P(FAKE), the head trained on cached features."""
    features = keras.Input((FEATURE_DIM,), name="features")
    return keras.Model(features, layers.Activation("sigmoid", dtype="float32", name="prob")(head(features)))


def backbone_of(model: keras.Model) -> keras.Model:
    return next(layer for layer in model.layers if isinstance(layer, keras.Model) and layer.name != "head")


H5_THRESHOLD = "cifake_threshold"  # the HDF5 attribute an exported model keeps its decision threshold in


def save(model: keras.Model, path: str | Path, threshold: float | None = None) -> None:
    """Save atomically, without optimizer state (a third of the size; fine-tuning builds a fresh optimizer). An
    HDF5 file (``.h5``) keeps ``threshold`` inside it, so the exported model carries its own; a ``.keras`` file has
    its threshold in the JSON beside it."""
    if getattr(model, "optimizer", None) is not None:
        # The same layers and weights in an uncompiled model: keras.models.clone_model re-compiles its clone, so
        # the saved file would still carry (fresh) optimizer slots, 2x the trainable weights.
        model = keras.Model(model.input, model.output, name=model.name)
    with atomic_path(path) as tmp:
        model.save(tmp)
        if threshold is not None and tmp.suffix == ".h5":
            import h5py

            with h5py.File(tmp, "a") as f:
                f.attrs[H5_THRESHOLD] = float(threshold)


def stored_threshold(path: str | Path) -> float | None:
    """The threshold an HDF5 model file carries (see :func:`save`); None for other files and where none was kept."""
    if Path(path).suffix != ".h5":
        return None
    import h5py

    with h5py.File(path, "r") as f:
        value = f.attrs.get(H5_THRESHOLD)
    return None if value is None else float(value)


def load(path: str | Path) -> keras.Model:
    """Load a saved classifier with one clear message for each way the file can be wrong."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"no model file at {path}: run `dvc repro train` (or advtrain) first, or pass --model")
    if path.stat().st_size == 0 or (path.suffix == ".keras" and not zipfile.is_zipfile(path)):
        raise ModelError(f"{path} is not a Keras model file (empty, truncated or another format); re-run its stage")
    try:
        return keras.models.load_model(path, compile=False)
    except ValueError as err:
        if "Lambda" in str(err):
            raise ModelError(f"{path} holds a Python Lambda layer; refusing to run code from a model file") from None
        raise ModelError(f"{path} could not be loaded as a cifake model ({err})") from None
    except (OSError, zipfile.BadZipFile, KeyError) as err:
        raise ModelError(f"{path} is damaged ({type(err).__name__}: {err}); re-run the stage that wrote it") from None


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
    fn = getattr(model, "_cifake_forward", None)
    if fn is None:
        import tensorflow as tf

        spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
        twin = compute_twin(model)
        fn = tf.function(lambda x: twin(x, training=False), input_signature=[spec])
        fn.output_tail = tuple(model.output_shape[1:])  # oneDNN rejects empty batches, so those never reach fn
        # On the model itself (past Keras's attribute tracking): it lives and dies with the model.
        object.__setattr__(model, "_cifake_forward", fn)
    return fn


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
