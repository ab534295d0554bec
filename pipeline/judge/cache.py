"""Evaluation passes kept by content, so that a rerun pays only for what changed.

``evaluate`` reruns whenever any of its inputs changes, but most of its passes do not depend on most of them: an
edit to ``advtrain`` leaves the undefended model's attacks as they were, a new Square budget leaves PGD's. Each pass
(clean scores, one attack, the corruptions, the curve) is stored under a key of everything it depends on: the
model's weights and architecture, the test images, the seed, the inference engine, the library versions, the code
of :mod:`pipeline.judge.evaluation` and all it imports, and the pass's own settings. A changed input makes a new key, so
a stale entry is never read; only the newest ``KEEP`` models' entries stay.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np

from pipeline import config, provenance
from pipeline.io import atomic_path, keep_newest
from pipeline.model import inference

log = logging.getLogger(__name__)
KEEP = 6  # models: a candidate, its baseline and a champion, for this setting and one other


def model_key(model: keras.Model, x: np.ndarray, y: np.ndarray, seed: int, inference_cfg: config.Inference,
              batch_size: int, threshold: float = 0.5) -> str:
    """What every pass on ``model`` and these test images depends on (under ``inference.precision: checked``,
    the threshold too: whether bf16 keeps the labels is judged there)."""
    import tensorflow as tf

    h = hashlib.sha256(model.to_json().encode())
    for w in model.weights:
        h.update(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).tobytes())
    h.update(np.ascontiguousarray(x).tobytes())
    h.update(np.asarray(y, np.uint8).tobytes())
    h.update(f"|{seed}|{batch_size}|{inference.describe(inference_cfg)}|{inference.engine_version(inference_cfg)}|".encode())
    if inference_cfg.precision == "checked":
        h.update(f"|{inference_cfg.model_dump_json()}|{threshold}|".encode())
    h.update(f"|{keras.__version__}|{tf.__version__}|{provenance.code_digest('pipeline.judge.evaluation')}|".encode())
    return h.hexdigest()[:20]


def digest(a: np.ndarray | None) -> str | None:
    """A short content hash of an input array a pass depends on (a transfer attack's source images)."""
    return None if a is None else hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


class PassCache:
    """``cache(name, spec, compute)``: the arrays ``compute()`` returns, read back when a pass with the same
    ``name`` and ``spec`` (JSON-able settings) ran before on the same model key. ``root`` None: always computes.
    ``hits`` names the passes read back in this run."""

    def __init__(self, root: Path | None, key: str = ""):
        self.dir = None if root is None else Path(root) / key
        self.hits: list[str] = []
        if self.dir is not None and self.dir.is_dir():
            os.utime(self.dir)  # recently used: pruning keeps the newest
        elif self.dir is not None:
            prune(Path(root), KEEP - 1)

    def __call__(self, name: str, spec: Any, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        if self.dir is None:
            return compute()
        spec_key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
        path = self.dir / f"{name}-{spec_key}.npz"
        if path.is_file():
            try:
                with np.load(path) as stored:
                    out = {k: stored[k] for k in stored.files}
                self.hits.append(name)
                return out
            except (OSError, ValueError) as err:  # a damaged entry is recomputed, never trusted
                log.warning("evaluate cache: %s unreadable (%s); recomputing", path, err)
        out = compute()
        with atomic_path(path) as tmp:
            np.savez(tmp, **out)
        return out


def prune(root: Path, keep: int = KEEP) -> list[Path]:
    """Delete all but the ``keep`` most recently used models' entries under ``root``; returns what was deleted."""
    return keep_newest((p for p in root.glob("*") if p.is_dir()), keep, "evaluate cache")
