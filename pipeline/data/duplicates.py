"""Near-duplicates across splits: a test image that also sits in train (as is, re-saved, or mirrored) inflates the
test score. CIFAKE's REAL class is CIFAR-10, where about 3 % of test images have near-duplicates in train (ciFAIR).

Each image becomes a signature: its grey levels averaged over ``BLOCK``×``BLOCK`` blocks (8×8 of a 32×32 image),
minus their mean, divided by their norm. Two images are near-duplicates when the cosine similarity of their
signatures, or of one and the other's mirror image, reaches ``threshold``. Block means shrug off faint marks and
most of a JPEG re-save; centring and scaling shrug off brightness and contrast; the mirror catches flips. The norm
is floored at ``MIN_CONTRAST`` grey levels: on a nearly flat image the signature would be all noise, and two
unrelated flat images would match, so such an image scores low against everything and only an exact copy (a pixel
hash, checked too) finds it. Recall on planted duplicates and the false matches on the built-in sample:
bench/README.md#duplicatespy; tests/data/test_duplicates.py checks both.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

BLOCK = 4
MIN_CONTRAST = 3  # grey levels (RMS over the blocks)
_ROWS = 512  # query rows per matrix product: bounds memory at CIFAKE size (512 × 100,000 floats)


def signatures(x: np.ndarray) -> np.ndarray:
    """Unit-length, zero-mean block-averaged grey levels of uint8 N×S×S×3 images, float32 N×(S/BLOCK)²."""
    x = np.asarray(x, np.float32)
    n, s = len(x), x.shape[1]
    grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
    blocks = grey.reshape(n, s // BLOCK, BLOCK, s // BLOCK, BLOCK).mean(axis=(2, 4))
    flat = blocks.reshape(n, -1)
    flat -= flat.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(flat, axis=1, keepdims=True)
    return flat / np.maximum(norm, MIN_CONTRAST * np.sqrt(flat.shape[1]))


def mirrored(sig: np.ndarray, side: int) -> np.ndarray:
    """The signatures of the images flipped left-right (block means commute with the flip)."""
    return sig.reshape(len(sig), side, side)[:, :, ::-1].reshape(len(sig), -1)


@dataclass
class Matches:
    query: np.ndarray  # indices into the query set that have a near-duplicate in the reference set
    reference: np.ndarray  # the most similar reference image of each
    similarity: np.ndarray


def _exact(query: np.ndarray, reference: np.ndarray) -> dict[int, int]:
    """Query index -> reference index for pixel-identical images, as is or mirrored."""
    def key(img: np.ndarray) -> bytes:
        return hashlib.blake2b(np.ascontiguousarray(img).tobytes(), digest_size=16).digest()

    seen: dict[bytes, int] = {}
    for j, img in enumerate(reference):
        seen.setdefault(key(img), j)
        seen.setdefault(key(img[:, ::-1]), j)
    keys = (key(img) for img in query)
    return {i: seen[k] for i, k in enumerate(keys) if k in seen}


def find(query: np.ndarray, reference: np.ndarray, threshold: float) -> Matches:
    """Each ``query`` image whose most similar ``reference`` image (as is or mirrored) reaches ``threshold``, or
    that has an exact copy there (similarity 1)."""
    q, r = signatures(query), signatures(reference)
    side = query.shape[1] // BLOCK
    r_both = np.concatenate([r, mirrored(r, side)]).T  # one product for both orientations
    best = np.full(len(q), -1.0, np.float32)
    arg = np.zeros(len(q), np.int64)
    for i in range(0, len(q), _ROWS):
        sim = q[i : i + _ROWS] @ r_both
        arg[i : i + _ROWS] = sim.argmax(axis=1) % len(r)
        best[i : i + _ROWS] = sim.max(axis=1)
    for i, j in _exact(query, reference).items():
        best[i], arg[i] = 1.0, j
    hit = np.flatnonzero(best >= threshold)
    return Matches(hit, arg[hit], best[hit])
