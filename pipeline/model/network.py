"""The classifier: pixels in [0, 1] -> P(FAKE), a ResNet50 backbone and a small head.

The model does its own preprocessing (resize, ResNet50's caffe normalisation), so attacks and users work in pixel
space and what is saved is what is served. Its last layer ``head`` returns the logit and a separate sigmoid turns it
into a probability: attacks differentiate the logit, because the gradient of a saturated sigmoid vanishes.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import keras
from keras import layers, ops

from pipeline import config
from pipeline.errors import ModelError
from pipeline.model.derived import derived

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
    return derived(model, "features", lambda: keras.Model(model.input, model.get_layer("gap").output, name="features"))


def head_classifier(head: keras.Model) -> keras.Model:
    """Features -> P(FAKE), the head trained on cached features."""
    features = keras.Input((FEATURE_DIM,), name="features")
    return keras.Model(features, layers.Activation("sigmoid", dtype="float32", name="prob")(head(features)))


def backbone_of(model: keras.Model) -> keras.Model:
    return next(layer for layer in model.layers if isinstance(layer, keras.Model) and layer.name != "head")


