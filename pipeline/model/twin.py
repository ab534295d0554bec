"""The compute twin: the same network with its small-map convolutions run as matrix products and frozen batch
norms folded in (the same sums in another order, faster on a CPU: bench/README.md#the-compute-twin), and the
pixels -> logit model built on it.

Attacks and every compiled forward pass run the twin; the saved model stays the plain Keras network.
"""
from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

from pipeline.model.derived import derived


def logits_model(model: keras.Model) -> keras.Model:
    """Pixels -> logit, for attacks and losses that must not pass through a saturating sigmoid: the
    :func:`compute_twin` of that part of ``model``, built once per model."""
    # The sigmoid's input, not the head's output: the head may also have been called on cached features.
    return derived(model, "logits", lambda: compute_twin(
        keras.Model(model.input, model.get_layer("prob").input, name="logits")))


# oneDNN's convolutions on ResNet50's last maps at 32x32 (1x1 and 2x2 pixels) run far below its matrix products'
# rate, so the twin computes them as matrix products; a 3x3 kernel on a 4x4 map runs faster as the convolution, so
# the twin stops at 4 pixels. Both measured in bench/README.md#the-compute-twin.
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
    return derived(model, "twin", lambda: _rewrite_convolutions(model))


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
