"""What the built-in sample's construction proves: the share of images a detector can keep right under an
L-infinity attack of a given size (a lower and an upper bound), read from the two periodic cues of
:mod:`pipeline.data.sample`."""
from __future__ import annotations

import numpy as np

from pipeline.data.sample import CHECKERBOARD, LINES


def mark_score(x: np.ndarray) -> np.ndarray:
    """The reference classifier's statistic, in 8-bit units: mean over pixels and channels of image x checkerboard;
    > 0 says FAKE. Its gradient has L1 norm 1 per 8-bit unit, so an L-infinity change of epsilon moves it by at most
    epsilon: where ``|score| > epsilon`` and the sign is right, no attack within epsilon can flip it."""
    return (np.asarray(x, np.float64) * CHECKERBOARD).mean((1, 2, 3))


def certified_accuracy(x: np.ndarray, y: np.ndarray, epsilon: float) -> float:
    """Share of images the reference classifier gets right with a margin above ``epsilon`` (8-bit units): a lower
    bound on its accuracy under any L-infinity attack of that size."""
    s = mark_score(x)
    return float(((np.sign(s) == np.where(np.asarray(y) == 1, 1, -1)) & (np.abs(s) > epsilon)).mean())


def lines_score(x: np.ndarray) -> np.ndarray:
    """The non-robust cue's statistic, like :func:`mark_score`: about +lines on FAKE, -lines on REAL."""
    return (np.asarray(x, np.float64) * LINES).mean((1, 2, 3))


def robustness_bounds(x: np.ndarray, y: np.ndarray, epsilon: float) -> dict[str, float]:
    """What the sample's construction proves about balanced accuracy under an L-infinity attack of ``epsilon``
    (8-bit units) on the images ``x``:

    * ``lower``: a detector this robust exists. The reference classifier (the sign of :func:`mark_score`) is right
      with a margin above epsilon on this share (:func:`certified_accuracy`, per class, averaged).
    * ``upper``: no detector that decides from the two periodic cues (the mark and the lines) does better. Their
      patterns are orthogonal +-1 patterns, so a change of epsilon moves the pair of scores by at most epsilon in
      L1 (and any such move is a change of epsilon). A FAKE and a REAL image whose score pairs lie within 2 x
      epsilon of each other meet in the middle: whatever a detector answers there, one of the two is lost. The
      best any such detector can do is then exact: every image but a minimum weighted vertex cover of these
      conflicts (König: a maximum flow), each image weighted so that the two classes count equally. A detector
      that kept part of the faint texture fingerprint under attack could pass it; an attack scrubs that too
      (the undefended model's PGD figure says how well).
    """
    return _bounds(_cues(x), np.asarray(y).astype(bool), epsilon)


def _cues(x: np.ndarray) -> np.ndarray:
    """Each image's two periodic cue scores (the mark, the lines): what the bounds are proven on."""
    return np.stack([mark_score(x), lines_score(x)], 1)


def _conflicts(fake: np.ndarray, real: np.ndarray, epsilon: float, block: int = 1 << 22) -> tuple[np.ndarray, ...]:
    """(fake, real) index pairs whose cue pairs lie within 2 x epsilon in L1, a block of fakes at a time: the whole
    fake x real table is gigabytes at CIFAKE size (10,000 x 10,000 pairs)."""
    rows = max(1, block // max(1, len(real)))
    found = [np.nonzero(np.abs(fake[i : i + rows, None] - real[None]).sum(-1) <= 2 * epsilon)
             for i in range(0, len(fake), rows)]
    f = np.concatenate([b[0] + i * rows for i, b in enumerate(found)]) if found else np.zeros(0, int)
    r = np.concatenate([b[1] for b in found]) if found else np.zeros(0, int)
    return f, r


def _bounds(cues: np.ndarray, y: np.ndarray, epsilon: float) -> dict[str, float]:
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_flow

    m = cues[:, 0]
    lower = [float(((np.sign(m) == (1 if c else -1)) & (np.abs(m) > epsilon))[y == c].mean()) for c in (False, True)]
    fake, real = cues[y], cues[~y]
    f, r = _conflicts(fake, real, epsilon)
    n_f, n_r = len(fake), len(real)
    # Nodes: source 0, fakes 1..n_f, reals after them, sink last. Weights n_r per fake and n_f per real make the
    # classes count equally in integers; a conflict edge outweighs everything, so a cut is a vertex cover.
    big = n_f * n_r + 1
    tails = np.concatenate([np.zeros(n_f, int), 1 + f, 1 + n_f + np.arange(n_r)])
    heads = np.concatenate([1 + np.arange(n_f), 1 + n_f + r, np.full(n_r, 1 + n_f + n_r)])
    caps = np.concatenate([np.full(n_f, n_r), np.full(len(f), big), np.full(n_r, n_f)]).astype(np.int64)
    graph = csr_matrix((caps, (tails, heads)), shape=(n_f + n_r + 2,) * 2)
    cover = maximum_flow(graph, 0, n_f + n_r + 1).flow_value
    return {"epsilon": float(epsilon), "lower": sum(lower) / 2, "upper": float(1.0 - cover / (2.0 * n_f * n_r))}


def bounds_by_epsilon(x: np.ndarray, y: np.ndarray, epsilons: list[float]) -> dict[str, dict[str, float]]:
    """:func:`robustness_bounds` at each distinct epsilon, keyed ``eps8`` (metrics files and MLflow keys)."""
    cues, y = _cues(x), np.asarray(y).astype(bool)  # once for all epsilons
    return {f"eps{e:g}": _bounds(cues, y, e) for e in sorted(set(epsilons))}
