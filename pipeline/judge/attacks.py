"""L∞ attacks in pixel space [0, 1], untargeted, against the true labels: FGSM and PGD (``Attacker``), and for
evaluation APGD-CE (``APGD``, white-box) and the score-based black-box Square attack (``SquareAttack``), below.

Epsilon and step size are in 8-bit pixel units (``epsilon: 8`` is 8/255). The steps follow binary cross-entropy's
gradient sign, taken through the model's logit (see ``margin_and_gradient``): differentiating the sigmoid output
instead gives zero gradients once it saturates, and the attack silently does nothing. Each step is one call of
the model's one compiled gradient over a whole batch, whatever the attack, epsilon or batch size: it is traced once.
PGD with ``restarts`` > 1 runs from several random starts and keeps, per image, the one that did the most damage.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from pipeline import config
from pipeline.model.derived import derived
from pipeline.model.inference import to_unit
from pipeline.model.network import INPUT_SHAPE
from pipeline.model.twin import logits_model


def margin_and_gradient(model: keras.Model):
    """Per image, the attack's loss, the margin -(2y - 1)·z through the logit z, and its input gradient: one compiled
    function per model (``x`` [0, 1] float32 batches, ``y`` 0/1 labels of shape (n,)), shared by every attack on it
    (FGSM, PGD, APGD, advtrain's step). Tracing ResNet50's gradient is slow, and an attack loop compiled around it
    costs several traces more (bench/README.md#attacks); the loops around this one run in Python, cheap beside a
    gradient.

    Not BCE itself: its gradient (sigmoid(z) - y) underflows to exactly 0 in float32 once |z| > ~88, and the most
    confident images would silently go unattacked. Each image's logit depends on that image alone, so the margin
    gives the same steps (signs) as BCE wherever BCE's gradient is non-zero, and never vanishes."""
    return derived(model, "margin_gradient", lambda: margin_gradient_of(logits_model(model)))


def margin_gradient_of(logits: keras.Model):
    """:func:`margin_and_gradient`'s compiled function through any pixels -> logit network (a fresh trace)."""

    @tf.function(input_signature=[tf.TensorSpec((None, *INPUT_SHAPE), tf.float32), tf.TensorSpec((None,), tf.float32)])
    def fn(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            margin = (1.0 - 2.0 * y) * tf.cast(logits(x, training=False), tf.float32)[:, 0]
            total = tf.reduce_sum(margin)  # inside the tape, or the gradient is None
        return margin, tape.gradient(total, x)

    return fn


SETTLE = 3  # iterates in a row an image stays fooled before PGD or APGD with ``stop_at`` lets it go


def logits_of(thresholds: tuple[float, ...]) -> np.ndarray:
    """The logit at each P(FAKE) threshold: the label there is FAKE where the logit is at least this."""
    t = np.asarray(thresholds, np.float64).reshape(-1)
    return np.log(t / (1.0 - t))


class Unfooled:
    """Which images an attack with ``stop_at`` still works on: each leaves once its margin -(2y - 1)·z has been beyond
    every one of the logit ``cuts`` (its label wrong at each threshold) for SETTLE iterates in a row."""

    def __init__(self, y: np.ndarray, cuts: np.ndarray):
        sign = 1.0 - 2.0 * np.asarray(y, np.float64).reshape(-1)
        self.boundary = np.max(sign[:, None] * cuts[None, :], axis=1)
        self.fooled_for = np.zeros(len(sign), np.int64)

    def indices(self) -> np.ndarray:
        return np.flatnonzero(self.fooled_for < SETTLE)

    def update(self, at: np.ndarray, margin: np.ndarray) -> np.ndarray:
        """The margins of the images ``at`` at their current iterate; returns which of them still stand."""
        self.fooled_for[at] = np.where(margin > self.boundary[at], self.fooled_for[at] + 1, 0)
        return self.fooled_for[at] < SETTLE


class Attacker:
    """Perturbs batches against ``model`` (a pixels -> P(FAKE) classifier from :mod:`pipeline.model.network`)."""

    def __init__(self, model: keras.Model, attack: config.Attack, seed: int = 0,
                 stop_at: tuple[float, ...] | None = None):
        self.attack, self.model = attack, model
        self.gradient = margin_and_gradient(model)
        self.rng = tf.random.Generator.from_seed(seed)
        # PGD in evaluation: an image leaves the attack once its label has stayed wrong at every threshold of
        # ``stop_at`` (those its attacked scores are read at) for SETTLE iterates in a row (AutoAttack's rule: an
        # image fooled is counted fooled), so the undefended model's images go after a few steps instead of all of
        # them. The iterates past the flip move it clear of the thresholds, so the 8-bit rounding and the inference
        # engine's own float errors do not flip it back.
        self.cuts = None if stop_at is None else logits_of(stop_at)
        self.spent = 0  # images through the input gradient so far: what the attacks cost (bench/fullscale.py)

    def _gradient(self, x, y):
        self.spent += int(x.shape[0])
        return self.gradient(x, y)

    def gradient_sign(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """The sign of the attack loss's input gradient at ``x`` (``y`` shaped (n,)): FGSM's step."""
        return tf.sign(self._gradient(x, y)[1])

    def _pgd(self, x: tf.Tensor, y: tf.Tensor, eps: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
        x_adv = x
        if self.attack.random_start:
            x_adv = tf.clip_by_value(x + self.rng.uniform(tf.shape(x), -eps, eps), 0.0, 1.0)
        if self.cuts is not None:
            return self._pgd_until_fooled(x, y, x_adv, eps, step)
        for _ in range(self.attack.steps):
            x_adv = x_adv + step * self.gradient_sign(x_adv, y)
            x_adv = tf.clip_by_value(tf.clip_by_value(x_adv, x - eps, x + eps), 0.0, 1.0)
        return x_adv

    def _pgd_until_fooled(self, x: tf.Tensor, y: tf.Tensor, x_adv: tf.Tensor, eps: tf.Tensor,
                          step: tf.Tensor) -> tf.Tensor:
        """PGD's steps on the images not yet fooled: each leaves with the iterate at which it had been fooled
        SETTLE times in a row (the margin the gradient pass returns comes free with each step)."""
        x, y, out = x.numpy(), y.numpy(), x_adv.numpy()
        unfooled = Unfooled(y, self.cuts)
        active = unfooled.indices()
        for _ in range(self.attack.steps):
            margin, grad = self._gradient(tf.constant(out[active]), tf.constant(y[active]))
            stay = unfooled.update(active, margin.numpy())
            active, grad = active[stay], grad.numpy()[stay]
            if not len(active):
                break
            moved = out[active] + step.numpy() * np.sign(grad)
            out[active] = np.clip(np.clip(moved, x[active] - eps.numpy(), x[active] + eps.numpy()), 0.0, 1.0)
        return tf.constant(out)

    def perturb_batch(self, x: np.ndarray | tf.Tensor, y: np.ndarray | tf.Tensor, epsilon: float | None = None):
        """One batch: ``x`` in [0, 1] float32, ``y`` 0/1 labels; returns a float32 tensor in [0, 1]."""
        a = self.attack
        eps = tf.constant((a.epsilon if epsilon is None else epsilon) / 255.0, tf.float32)
        x = tf.convert_to_tensor(x, tf.float32)
        y = tf.reshape(tf.cast(y, tf.float32), (-1,))
        if a.name == "fgsm":
            return tf.clip_by_value(x + eps * self.gradient_sign(x, y), 0.0, 1.0)
        step = tf.constant(a.step_size / 255.0, tf.float32)
        best = self._pgd(x, y, eps, step)
        if a.restarts > 1:  # per image, the start that did the most damage: its margin, a forward pass
            logits, sign = logit_forward(self.model), 1.0 - 2.0 * y.numpy()
            best_loss = sign * logits(best)
            for _ in range(a.restarts - 1):
                x_adv = self._pgd(x, y, eps, step)
                loss = sign * logits(x_adv)
                best = tf.where((loss > best_loss)[:, None, None, None], x_adv, best)
                best_loss = np.maximum(loss, best_loss)
        return best

    def perturb(self, x: np.ndarray, y: np.ndarray, batch_size: int, epsilon: float | None = None,
                progress: str | None = None) -> np.ndarray:
        """The whole set, batch by batch; ``x`` uint8 or [0, 1] float. Returns float32 in [0, 1]."""
        from tqdm import tqdm

        out = np.empty((len(x), *INPUT_SHAPE), np.float32)
        starts = range(0, len(x), batch_size)
        for i in tqdm(starts, desc=progress, unit="batch", leave=False, disable=progress is None):
            out[i : i + batch_size] = self.perturb_batch(to_unit(x[i : i + batch_size]), y[i : i + batch_size], epsilon)
        return out

    def signs(self, x: np.ndarray, y: np.ndarray, batch_size: int, progress: str | None = None) -> np.ndarray:
        """The sign of each image's input gradient (int8): FGSM's step at every epsilon."""
        from tqdm import tqdm

        signs = np.empty((len(x), *INPUT_SHAPE), np.int8)
        starts = range(0, len(x), batch_size)
        for i in tqdm(starts, desc=progress, unit="batch", leave=False, disable=progress is None):
            yb = tf.reshape(tf.cast(y[i : i + batch_size], tf.float32), (-1,))
            signs[i : i + batch_size] = self.gradient_sign(tf.constant(to_unit(x[i : i + batch_size])), yb).numpy()
        return signs

    def sweep(self, x: np.ndarray, y: np.ndarray, epsilons: list[float], batch_size: int,
              progress: str | None = None, signs: np.ndarray | None = None) -> dict[float, np.ndarray]:
        """The attacked set at each epsilon, as uint8 (what a PNG holds).

        FGSM's step direction, the sign of the input gradient at ``x``, does not depend on epsilon: one gradient
        pass (or the ``signs`` already computed for ``x``) serves the whole list, where PGD needs a full attack
        per epsilon."""
        if self.attack.name != "fgsm":
            return {e: to_uint8(self.perturb(x, y, batch_size, e, progress)) for e in epsilons}
        if signs is None:
            signs = self.signs(x, y, batch_size, progress)
        unit = to_unit(x)
        return {e: to_uint8(np.clip(unit + np.float32(e / 255.0) * signs, 0.0, 1.0)) for e in epsilons}


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Round [0, 1] floats to 8-bit pixels, as writing a PNG does: metrics are computed on exactly what is saved."""
    return np.clip(np.rint(np.asarray(x) * 255.0), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------ APGD-CE and Square
#
# The two attacks AutoAttack adds to PGD, for evaluation: APGD-CE (white-box, gradient) and Square (black-box, scores
# only). Both take uint8 or [0, 1] float NHWC images and 0/1 labels, work in pixel space [0, 1] with an L∞ budget in
# 8-bit units, and share one shape: ``run(x, y, batch_size, epsilon=None, progress=None) -> AttackResult`` and
# ``perturb(...)``, the images alone (float32 in [0, 1], each within epsilon of its input), as ``Attacker.perturb``.

@dataclass
class AttackResult:
    x_adv: np.ndarray  # float32 in [0, 1], each image within epsilon (L∞) of its input
    loss: np.ndarray  # per image, float64. APGD: the cross-entropy at x_adv. Square: its margin (<= 0: fooled)
    queries: np.ndarray  # per image: model passes spent on it (APGD forward+backward passes, Square forward queries)

    @property
    def mean_queries(self) -> float:
        return float(np.mean(self.queries)) if len(self.queries) else 0.0


def _labels(y) -> np.ndarray:
    return np.asarray(y).reshape(-1).astype(np.float32)


def _project(v: np.ndarray, x: np.ndarray, eps: np.float32) -> np.ndarray:
    """Onto the L∞ ball of radius ``eps`` around ``x``, then onto the pixel range."""
    return np.clip(np.clip(v, x - eps, x + eps), 0.0, 1.0)


def apgd_checkpoints(steps: int) -> list[int]:
    """APGD's step-size checkpoints w_j = ceil(p_j · steps) for j >= 1 (Croce and Hein 2020, §3.2): p_0 = 0,
    p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), while p_j <= 1. Duplicates (few steps) collapse."""
    p = [0.0, 0.22]
    while True:
        nxt = round(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06), 10)  # rounded: 0.22 + 0.19 is 0.41, not 0.41000001
        if nxt > 1.0:
            break
        p.append(nxt)
    # ceil(0.22 * 100) is 23 in floating point (22.000000000000004): the tolerance keeps it 22.
    return sorted({math.ceil(pj * steps - 1e-9) for pj in p[1:]} - {0})


@dataclass
class ApgdTrace:
    """What one APGD run did, for tests and diagnostics: rows are iterations, columns images."""
    step_size: list[np.ndarray] = field(default_factory=list)  # the η used by each step (steps rows)
    loss: list[np.ndarray] = field(default_factory=list)  # f(x^(k)) for k = 0..steps
    halved: dict[int, np.ndarray] = field(default_factory=dict)  # checkpoint w_j -> which images halved there


def apgd(objective_and_gradient: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], x: np.ndarray,
         start: np.ndarray, eps: float, steps: int, rho: float = 0.75, momentum: float = 0.75,
         trace: ApgdTrace | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """APGD, L∞ (Croce and Hein 2020, Algorithm 1), maximising ``objective_and_gradient(x) -> (f, ∇f)`` per image.

    ``x`` the clean images (n, ...), ``start`` x^(0) (inside the ball). The first step is plain, then each step takes
    η·sign(∇f) and mixes it with the previous move (momentum α = 0.75). Every image has its own η, 2·eps at first,
    halved at checkpoint w_j (:func:`apgd_checkpoints`) when either
      1. f increased in fewer than ρ·(w_j - w_{j-1}) of the steps since w_{j-1}, or
      2. η was not halved at w_{j-1} and the best f has not improved since w_{j-1};
    an image whose η halves restarts from its best point (and that point's gradient). As in the paper, condition 2
    applies at w_1 too (η^(0) = η^(w_1) trivially) and condition 1 is a strict "<"; the authors' code skips
    condition 2 at w_1 and uses "<=". Returns the best point per image (highest f seen), its f and the number of
    ``objective_and_gradient`` calls (steps + 1).
    """
    eps = np.float32(eps)
    n = len(x)
    xk = np.asarray(start, np.float32).copy()
    f, g = objective_and_gradient(xk)
    f, g = np.array(f, np.float64), np.array(g, np.float32)  # copies: rows are overwritten on a restart
    calls = 1
    best, f_best, g_best = xk.copy(), f.copy(), g.copy()
    eta = np.full((n,) + (1,) * (x.ndim - 1), 2.0 * eps, np.float32)
    x_prev = xk.copy()
    losses = [f]
    checkpoints = set(apgd_checkpoints(steps))
    last_check, f_best_at_last, halved_at_last = 0, f_best.copy(), np.zeros(n, bool)
    if trace is not None:
        trace.loss.append(f.copy())
    for k in range(steps):
        a = np.float32(1.0 if k == 0 else momentum)
        z = _project(xk + eta * np.sign(g), x, eps)
        x_next = _project(xk + a * (z - xk) + (1 - a) * (xk - x_prev), x, eps)
        if trace is not None:
            trace.step_size.append(eta.reshape(n).copy())
        x_prev, xk = xk, x_next
        f, g = objective_and_gradient(xk)
        f, g = np.array(f, np.float64), np.array(g, np.float32)
        calls += 1
        losses.append(f)
        if trace is not None:
            trace.loss.append(f.copy())
        better = f > f_best
        best[better], f_best[better], g_best[better] = xk[better], f[better], g[better]
        w = k + 1
        if w in checkpoints:
            increases = np.sum([losses[i + 1] > losses[i] for i in range(last_check, w)], axis=0)
            oscillating = increases < rho * (w - last_check)
            stalled = ~halved_at_last & (f_best <= f_best_at_last)
            halve = oscillating | stalled
            eta[halve] /= 2
            xk[halve], g[halve] = best[halve], g_best[halve]
            if trace is not None:
                trace.halved[w] = halve.copy()
            last_check, f_best_at_last, halved_at_last = w, f_best.copy(), halve
    return best, f_best, calls


class APGD:
    """APGD-CE against ``model`` (pixels -> P(FAKE)): cross-entropy on the two-logit view [0, z] of its logit z.

    That cross-entropy is softplus(-(2y - 1)·z), binary cross-entropy from the logit. The compiled pass returns the
    margin -(2y - 1)·z and its gradient instead: CE is a strictly increasing function of it, so every comparison APGD
    makes (improved? best point?) and the sign of every step are the same, while CE's own gradient,
    sigmoid(z) - y, underflows to 0 in float32 beyond |z| ~ 88 and would leave the most confident images unattacked
    (see ``margin_and_gradient``). The CE reported is computed from the margin in float64 (``np.logaddexp``).

    ``epsilon`` in 8-bit units; ``restarts`` random starts (uniform in the ball, scaled to touch it, as the authors'
    code), keeping per image the one with the highest loss; ``seed`` makes a run reproducible (each ``run`` call
    draws from a fresh generator, per batch).
    """

    def __init__(self, model: keras.Model, epsilon: float = 8.0, steps: int = 20, restarts: int = 1, seed: int = 0,
                 rho: float = 0.75, momentum: float = 0.75, stop_at: tuple[float, ...] | None = None):
        if steps < 1 or restarts < 1:
            raise ValueError(f"APGD needs steps >= 1 and restarts >= 1 (got steps={steps}, restarts={restarts})")
        self.epsilon, self.steps, self.restarts, self.seed = epsilon, steps, restarts, seed
        self.rho, self.momentum = rho, momentum
        self._pass = margin_and_gradient(model)
        # As Attacker's: an image fooled at the thresholds for SETTLE iterates in a row costs no more gradient passes
        # (APGD then sees its loss stand still; its best point, the highest margin seen, is a fooled one).
        self.cuts = None if stop_at is None else logits_of(stop_at)

    def run_batch(self, x: np.ndarray, y, epsilon: float | None = None, rng: np.random.Generator | None = None,
                  trace: ApgdTrace | None = None) -> AttackResult:
        """One batch (held in memory at once): ``x`` uint8 or [0, 1] float, ``y`` 0/1 labels."""
        x = to_unit(np.asarray(x))
        yt = tf.constant(_labels(y))
        eps = np.float32((self.epsilon if epsilon is None else epsilon) / 255.0)
        rng = np.random.default_rng(self.seed) if rng is None else rng

        unfooled = None if self.cuts is None else Unfooled(_labels(y), self.cuts)
        margin_at, grad_at = np.zeros(len(x)), np.zeros_like(x)
        spent = np.zeros(len(x), np.int64)  # gradient passes per image

        def objective_and_gradient(xb):
            if unfooled is None:
                spent[:] += 1
                margin, grad = self._pass(tf.constant(xb), yt)
                return margin.numpy(), grad.numpy()
            active = unfooled.indices()
            spent[active] += 1
            if len(active):
                margin, grad = self._pass(tf.constant(xb[active]), tf.gather(yt, active))
                margin_at[active], grad_at[active] = margin.numpy(), grad.numpy()
                unfooled.update(active, margin_at[active])
            return margin_at.copy(), grad_at.copy()

        best, best_margin = None, None
        for _ in range(self.restarts):
            t = rng.uniform(-1.0, 1.0, x.shape).astype(np.float32)
            t /= np.maximum(np.abs(t).reshape(len(x), -1).max(axis=1), 1e-12).reshape(-1, 1, 1, 1)
            start = np.clip(x + eps * t, 0.0, 1.0)
            found, margin, _ = apgd(objective_and_gradient, x, start, eps, self.steps, self.rho, self.momentum,
                                    trace if best is None else None)
            if best is None:
                best, best_margin = found, margin
            else:
                better = margin > best_margin
                best[better], best_margin[better] = found[better], margin[better]
        return AttackResult(best.astype(np.float32, copy=False), np.logaddexp(0.0, best_margin), spent)

    def run(self, x: np.ndarray, y, batch_size: int, epsilon: float | None = None,
            progress: str | None = None) -> AttackResult:
        """The whole set, batch by batch. Batch i draws its random starts from a generator seeded (seed, i)."""
        from tqdm import tqdm

        y = np.asarray(y).reshape(-1)
        out = np.empty((len(x), *INPUT_SHAPE), np.float32)
        loss, queries = np.empty(len(x)), np.zeros(len(x), np.int64)
        starts = range(0, len(x), batch_size)
        for b, i in enumerate(tqdm(starts, desc=progress, unit="batch", leave=False, disable=progress is None)):
            part = slice(i, i + batch_size)
            r = self.run_batch(x[part], y[part], epsilon, np.random.default_rng([self.seed, b]))
            out[part], loss[part], queries[part] = r.x_adv, r.loss, r.queries
        return AttackResult(out, loss, queries)

    def perturb(self, x: np.ndarray, y, batch_size: int, epsilon: float | None = None,
                progress: str | None = None) -> np.ndarray:
        return self.run(x, y, batch_size, epsilon, progress).x_adv


def logit_forward(model: keras.Model) -> Callable[[np.ndarray], np.ndarray]:
    """``model`` (pixels -> P(FAKE)) as the ``forward`` a :class:`SquareAttack` queries: [0, 1] images -> logits,
    through one compiled TensorFlow pass (no re-tracing across batch sizes)."""
    from pipeline.model.inference import forward_fn

    fn = forward_fn(logits_model(model))
    return lambda x: fn(tf.constant(x, tf.float32)).numpy()[:, 0]


def square_p(p_init: float, iteration: int, queries: int) -> float:
    """The fraction of pixels a Square attack window covers at ``iteration`` (0-based) of a ``queries`` budget: the
    authors' schedule (p_selection), halving after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of
    10 000, rescaled to the budget."""
    it = int(iteration / queries * 10000)
    for k, bound in enumerate((10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000, 10000)):
        if it <= bound:
            return p_init / 2**k
    return p_init


class SquareAttack:
    """The Square attack, L∞, untargeted (Andriushchenko et al. 2020): score-based, black-box, no gradient.

    ``forward(x) -> logits``: [0, 1] float32 NHWC images in, the model's logit z per image out (shape (n,) or (n, 1));
    any backend (TensorFlow through :func:`logit_forward`, OpenVINO, ...). The loss is the margin at the model's
    decision threshold t, (2y - 1)·(z - logit(t)): positive while the image is still labelled right, so an image
    stops costing queries once it is fooled at t. The run follows the authors' code: vertical stripes of ±eps per
    column and channel first (one query), then ``queries`` - 1 iterations, each drawing per image one s×s window
    (s from :func:`square_p`) set to x ± eps per channel (redrawn while it would change nothing), accepted when the
    margin drops. Images misclassified before the attack are returned unchanged; the clean pass that finds them is one
    extra forward pass per image, not counted in ``queries``, as in the paper. One difference: a window may start on
    any row and column, where the authors' ``randint(0, h - s)`` never reaches the last.
    """

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], epsilon: float = 8.0, queries: int = 1000,
                 p_init: float = 0.05, threshold: float = 0.5, seed: int = 0):
        if queries < 1 or not 0.0 < p_init < 1.0 or not 0.0 < threshold < 1.0:
            raise ValueError(f"Square: queries >= 1, 0 < p_init < 1, 0 < threshold < 1 "
                             f"(got {queries}, {p_init}, {threshold})")
        self.forward, self.epsilon, self.queries, self.p_init = forward, epsilon, queries, p_init
        self.threshold, self.seed = threshold, seed
        self.cut = math.log(threshold / (1.0 - threshold))  # the logit at the threshold

    def _margins(self, x: np.ndarray, sign: np.ndarray, batch_size: int) -> np.ndarray:
        z = np.concatenate([np.asarray(self.forward(x[i : i + batch_size]), np.float64).reshape(-1)
                            for i in range(0, len(x), batch_size)]) if len(x) else np.zeros(0)
        return sign * (z - self.cut)

    def run(self, x: np.ndarray, y, batch_size: int = 256, epsilon: float | None = None,
            progress: str | None = None) -> AttackResult:
        """The whole set at once (the images still unfooled are queried in batches of ``batch_size``)."""
        from tqdm import tqdm

        rng = np.random.default_rng(self.seed)
        x = to_unit(np.asarray(x))
        sign = 2.0 * np.asarray(y, np.float64).reshape(-1) - 1.0
        eps = np.float32((self.epsilon if epsilon is None else epsilon) / 255.0)
        n, h, w, c = x.shape
        queries = np.zeros(n, np.int64)
        margin = self._margins(x, sign, batch_size)
        best = x.copy()
        todo = np.flatnonzero(margin > 0)
        if eps == 0 or not len(todo):
            return AttackResult(best, margin, queries)
        # Vertical stripes: one sign per column and channel, the same down the whole column.
        stripes = eps * rng.choice(np.array([-1.0, 1.0], np.float32), (len(todo), 1, w, c))
        best[todo] = np.clip(x[todo] + stripes, 0.0, 1.0)
        margin[todo] = self._margins(best[todo], sign[todo], batch_size)
        queries[todo] += 1
        steps = range(self.queries - 1)
        for i in tqdm(steps, desc=progress, unit="query", leave=False, disable=progress is None):
            todo = todo[margin[todo] > 0]
            if not len(todo):
                break
            s = min(max(int(round(math.sqrt(square_p(self.p_init, i, self.queries) * h * w))), 1), h - 1)
            m = len(todo)
            rows = rng.integers(0, h - s + 1, m)[:, None] + np.arange(s)
            cols = rng.integers(0, w - s + 1, m)[:, None] + np.arange(s)
            at = (todo[:, None, None], rows[:, :, None], cols[:, None, :])
            clean_window, best_window = x[at], best[at]  # (m, s, s, c)
            deltas = eps * rng.choice(np.array([-1.0, 1.0], np.float32), (m, 1, 1, c))
            for _ in range(100):  # redraw the signs of windows that would stay as they are (the authors' loop)
                same = np.all(np.abs(np.clip(clean_window + deltas, 0.0, 1.0) - best_window) < 1e-7, axis=(1, 2, 3))
                if not same.any():
                    break
                deltas[same] = eps * rng.choice(np.array([-1.0, 1.0], np.float32), (int(same.sum()), 1, 1, c))
            trial = best[todo]
            trial[(np.arange(m)[:, None, None], rows[:, :, None], cols[:, None, :])] = np.clip(
                clean_window + deltas, 0.0, 1.0)
            new = self._margins(trial, sign[todo], batch_size)
            queries[todo] += 1
            better = new < margin[todo]
            best[todo[better]], margin[todo[better]] = trial[better], new[better]
        return AttackResult(best, margin, queries)

    def perturb(self, x: np.ndarray, y, batch_size: int = 256, epsilon: float | None = None,
                progress: str | None = None) -> np.ndarray:
        return self.run(x, y, batch_size, epsilon, progress).x_adv
