"""Grad-CAM: where in an image the classifier looks for the class it predicts, clean and under attack.

The map is computed on the served model's own graph, not on a copy: the gradient path runs the outer model's
layers in order (preprocessing, the backbone, pooling, the head), with the backbone swapped for a sub-model of itself
that also returns the explained layer's activations. A gradient model built from the nested backbone's ``.input``
would skip the preprocessing (so it explains other pixels than the model sees) or fail with a disconnected graph.

The score explained is the logit of the predicted class: +logit for images called FAKE, -logit for images called
REAL. The logit, not the probability, for the reason the attacks use it: the gradient of a saturated sigmoid
vanishes, and a confidently classified image would get an empty map.

At the default ``model.image_size`` (32), ResNet50's last stage (``conv5_block3_out``) is 1×1, so its map holds
one number and shows nothing; ``layer=None`` therefore picks the deepest stage output at least ``MIN_SIDE`` wide
(``conv3_block4_out``, 4×4, at size 32; ``conv5_block3_out``, 7×7, at size 224).
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from pipeline.classes import LABELS
from pipeline.errors import ModelError
from pipeline.model.derived import derived
from pipeline.model.inference import to_unit
from pipeline.model.network import INPUT_SHAPE, backbone_of

# ResNet50's stage outputs, deepest first: the usual Grad-CAM layers (semantic, yet still spatial).
STAGE_OUTPUTS = ("conv5_block3_out", "conv4_block6_out", "conv3_block4_out", "conv2_block3_out")
MIN_SIDE = 4  # a coarser map says "somewhere in the image", which is no explanation
ALPHA = 0.45


def _spatial_size(backbone: keras.Model, name: str) -> tuple[int, int]:
    try:
        shape = backbone.get_layer(name).output.shape
    except ValueError:
        examples = ", ".join(n for n in STAGE_OUTPUTS if n in {layer.name for layer in backbone.layers})
        raise ModelError(f"layer {name!r}: the backbone has no layer of that name (e.g. {examples})") from None
    if len(shape) != 4:
        raise ModelError(f"layer {name!r}: its output {tuple(shape)} has no spatial grid to map (need N×h×w×C)")
    return int(shape[1]), int(shape[2])


def resolve_layer(model: keras.Model, layer: str | None = None) -> str:
    """The layer to explain: ``layer`` once checked, or the deepest stage output at least ``MIN_SIDE`` wide.

    Separate so a tool can reject a wrong name before it reads a folder or writes anything.
    """
    backbone = backbone_of(model)
    if layer is not None:
        _spatial_size(backbone, layer)
        return layer
    names = {x.name for x in backbone.layers}
    present = [n for n in STAGE_OUTPUTS if n in names]
    if not present:
        raise ModelError(f"the backbone {backbone.name!r} has none of ResNet50's stage outputs; pass a layer name")
    return next((n for n in present if min(_spatial_size(backbone, n)) >= MIN_SIDE), present[-1])


def _gradcam_fn(model: keras.Model, layer: str):
    """The compiled pass for ``layer``: (maps, P(FAKE), logit), built once per model and layer (tracing takes
    seconds)."""
    return derived(model, ("gradcam", layer), lambda: _trace_gradcam(model, layer))


def _trace_gradcam(model: keras.Model, layer: str):
    backbone = backbone_of(model)
    _spatial_size(backbone, layer)
    # Same layer objects and weights as the backbone, one more output: the activations that the map weighs.
    tapped = keras.Model(backbone.inputs, [backbone.get_layer(layer).output, backbone.output],
                         name=f"{backbone.name}_gradcam")
    steps = [x for x in model.layers if not isinstance(x, keras.layers.InputLayer)]
    if [x.name for x in steps][-1] != "prob" or sum(x is backbone for x in steps) != 1:
        raise ModelError(f"model {model.name!r} is not a pixels -> ... -> backbone -> ... -> prob chain "
                         "(pipeline.model.network.assemble): cannot rebuild its gradient path")

    def run(x, threshold):
        with tf.GradientTape() as tape:
            # Watch the pixels, not only the activations: with a frozen backbone no variable is trainable, and
            # the tape would otherwise record nothing between the activations and the logit.
            tape.watch(x)
            h = x
            for step in steps:
                if step is backbone:
                    activations, h = tapped(h, training=False)
                elif step.name == "prob":
                    logit = tf.cast(h, tf.float32)[:, 0]
                    h = step(h, training=False)
                else:
                    h = step(h, training=False)
            p_fake = tf.cast(h, tf.float32)[:, 0]
            # Each image's score depends on that image alone (inference mode), so one sum gives every gradient.
            sign = tf.where(p_fake >= threshold, 1.0, -1.0)
            score = tf.reduce_sum(sign * logit)
        a = tf.cast(activations, tf.float32)
        grads = tf.cast(tape.gradient(score, activations), tf.float32)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # Grad-CAM's channel importance
        cam = tf.nn.relu(tf.reduce_sum(weights * a, axis=-1))
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        cam = tf.math.divide_no_nan(cam, peak)  # an all-zero map stays zero
        return cam, p_fake, logit

    spec = tf.TensorSpec((None, *INPUT_SHAPE), tf.float32)
    return tf.function(run, input_signature=[spec, tf.TensorSpec((), tf.float32)])


def gradcam_and_proba(model: keras.Model, x: np.ndarray, layer: str | None = None, batch_size: int = 64,
                      threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps (N×h×w, each in [0, 1]) and P(FAKE) (N) from one pass, so a map and the label it explains
    come from the same computation. ``threshold`` decides the predicted class whose logit is explained."""
    layer = resolve_layer(model, layer)
    fn = _gradcam_fn(model, layer)
    h, w = _spatial_size(backbone_of(model), layer)
    maps = np.zeros((len(x), h, w), np.float32)
    probs = np.zeros(len(x), np.float32)
    t = tf.constant(threshold, tf.float32)
    for i in range(0, len(x), batch_size):  # an empty x never reaches fn: oneDNN rejects empty batches
        cam, p, _ = fn(tf.constant(to_unit(np.asarray(x[i : i + batch_size]))), t)
        maps[i : i + batch_size] = cam.numpy()
        probs[i : i + batch_size] = p.numpy()
    return maps, probs


def gradcam(model: keras.Model, x: np.ndarray, layer: str | None = None, batch_size: int = 64,
            threshold: float = 0.5) -> np.ndarray:
    """Grad-CAM maps N×h×w in [0, 1] for uint8 (or [0, 1] float) images N×32×32×3, explaining the predicted class:
    the gradient of +logit for images with P(FAKE) >= ``threshold``, of -logit (the REAL logit) for the others.
    h×w is ``layer``'s grid at the model's internal image size; ``layer=None``: see :func:`resolve_layer`.
    ``threshold=0`` explains FAKE for every image (where the FAKE evidence is), above 1 REAL for every image."""
    return gradcam_and_proba(model, x, layer, batch_size, threshold)[0]


def _as_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)  # [0, 1] floats, as attacks return them


def overlay(image_uint8: np.ndarray, heatmap: np.ndarray, size: int = 128, cmap: str = "jet",
            alpha: float = ALPHA) -> np.ndarray:
    """The image, enlarged with nearest neighbours (its pixels are what the model saw, so keep them sharp), with
    the map enlarged bilinearly (it is a coarse grid; blocks would suggest a precision it lacks) blended on top.

    Returns uint8 ``size×size×3``.
    """
    from matplotlib import colormaps
    from PIL import Image

    img = Image.fromarray(_as_uint8(image_uint8)).resize((size, size), Image.Resampling.NEAREST)
    heat = Image.fromarray(np.asarray(heatmap, np.float32), mode="F").resize((size, size), Image.Resampling.BILINEAR)
    colour = colormaps[cmap](np.clip(np.asarray(heat), 0.0, 1.0))[..., :3] * 255.0
    blended = (1.0 - alpha) * np.asarray(img, np.float32) + alpha * colour
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def output_name(name: str) -> str:
    """A flat file name for an image's overlay: ``nested/dir/a.jpg`` -> ``nested__dir__a.png``."""
    stem = name.rsplit(".", 1)[0] if "." in name.rsplit("/", 1)[-1] else name
    return f"{stem.replace('/', '__')}.png"


def output_names(names: list[str]) -> dict[str, str]:
    """:func:`output_name` for every image, unique: where two would share one (``a.jpg`` and ``a.png``), each keeps
    its own suffix (``a.jpg.png``, ``a.png.png``), so no overlay overwrites another or lands under another's name."""
    flat = {name: output_name(name) for name in names}
    counts: dict[str, int] = {}
    for target in flat.values():
        counts[target] = counts.get(target, 0) + 1
    out, used = {}, set()
    for name, target in flat.items():
        if counts[target] > 1:
            target = f"{name.replace('/', '__')}.png"
        base, n = target[:-4], 1
        while target in used:  # only names built to look like another's (``a.jpg.png`` next to ``a.jpg``)
            n += 1
            target = f"{base}~{n}.png"
        used.add(target)
        out[name] = target
    return out


def _title(p_fake: float, threshold: float, truth: int | None = None) -> str:
    said = f"{LABELS[int(p_fake >= threshold)]}, P(FAKE) {p_fake:.2f}"
    return said if truth is None else f"true {LABELS[int(truth)]}\npredicted {said}"


def grid_figure(x_clean: np.ndarray, x_adv: np.ndarray, maps_clean: np.ndarray, maps_adv: np.ndarray,
                p_clean: np.ndarray, p_adv: np.ndarray, y: np.ndarray, threshold: float = 0.5):
    """One row per image: clean image, its Grad-CAM, attacked image, its Grad-CAM; to see whether an attack that
    flips the answer also moves where the model looks.

    Built on :class:`matplotlib.figure.Figure` directly (no pyplot state), so it is safe in stages and threads.
    """
    from matplotlib.figure import Figure

    n = len(x_clean)
    fig = Figure(figsize=(4 * 2.0, max(n, 1) * 2.3), layout="constrained")
    axes = fig.subplots(max(n, 1), 4, squeeze=False)
    for i in range(n):
        cells = (
            (_as_uint8(x_clean[i]), f"clean\n{_title(float(p_clean[i]), threshold, int(y[i]))}"),
            (overlay(x_clean[i], maps_clean[i]), "clean Grad-CAM"),
            (_as_uint8(x_adv[i]), f"attacked\n{_title(float(p_adv[i]), threshold, int(y[i]))}"),
            (overlay(x_adv[i], maps_adv[i]), "attacked Grad-CAM"),
        )
        for ax, (picture, title) in zip(axes[i], cells):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(title, fontsize=7)
            ax.set_axis_off()
    return fig


def figure_for(model: keras.Model, x: np.ndarray, x_adv: np.ndarray, y: np.ndarray, threshold: float,
               per_class: int = 4):
    """:func:`grid_figure` for the first ``per_class`` images of each class (fixed, so runs compare image by
    image): where the model looks on the clean image and on its attacked version."""
    pick = np.concatenate([np.flatnonzero(np.asarray(y) == c)[:per_class] for c in (0, 1)])
    maps_clean, p_clean = gradcam_and_proba(model, x[pick], threshold=threshold)
    maps_adv, p_adv = gradcam_and_proba(model, x_adv[pick], threshold=threshold)
    return grid_figure(x[pick], x_adv[pick], maps_clean, maps_adv, p_clean, p_adv, np.asarray(y)[pick], threshold)
