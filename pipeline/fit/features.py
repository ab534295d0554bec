"""Backbone features, computed once and cached by content.

With a frozen backbone the pooled features do not depend on the head's hyperparameters, so every tuning trial
and the final head training read the same cached arrays. The cache key covers everything the features depend
on: the image bytes, the weights, the image size, the precision, the seed, the library versions and the code that
computes them (this module and :mod:`pipeline.model.network` with what it imports). Only the newest ``KEEP`` entries per
split stay in the cache: a run never reuses a stale entry, and old ones do not pile up (each is N x 2048 float32).
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import keras
import numpy as np

from pipeline import config, provenance
from pipeline.io import atomic_path, keep_newest, shared_cache
from pipeline.model import inference
from pipeline.model.network import feature_extractor

log = logging.getLogger(__name__)
KEEP = 2  # entries per split: the current setting and one other (e.g. two dvc exp branches in turn)


def _file_digest(path: Path, h: hashlib._Hash) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)


def cache_key(x_file: Path, cfg: config.Model, seed: int, inference_cfg: config.Inference = inference.AUTO) -> str:
    import tensorflow as tf

    h = hashlib.sha256()
    _file_digest(x_file, h)
    # The seed matters with weights: none, where the backbone's random weights come from it.
    # The batch too: features move slightly with it (README.md#what-an-edit-reruns), and DVC reruns tune and train
    # on it.
    h.update(f"|{cfg.weights}|{cfg.image_size}|{cfg.precision}|{cfg.batch_size}|{seed}|{keras.__version__}|"
             f"{tf.__version__}".encode())
    h.update(f"|{inference.describe(inference_cfg)}|{inference.engine_version(inference_cfg)}|".encode())
    h.update(f"|{provenance.code_digest('pipeline.model.inference')}|".encode())
    h.update(Path(__file__).read_bytes())
    if cfg.weights not in ("imagenet", "none"):
        _file_digest(Path(cfg.weights), h)
    return h.hexdigest()[:20]


def extract(model: keras.Model, x: np.ndarray, batch_size: int, desc: str = "features",
            inference_cfg: config.Inference = inference.AUTO) -> np.ndarray:
    """Pooled backbone features (N×2048 float32) for uint8 images, through the inference engine."""
    return inference.runner(feature_extractor(model), inference_cfg)(x, batch_size, progress=desc)


def cached(model: keras.Model, x: np.ndarray, x_file: Path, cfg: config.Model, seed: int, cache_dir: Path,
           name: str, inference_cfg: config.Inference = inference.AUTO) -> np.ndarray:
    """Features of ``x`` (read from ``x_file``), from ``cache_dir`` when a run with the same inputs made them.

    ``model`` must have been built from ``cfg`` and ``seed`` (see :func:`pipeline.model.network.build_model`).
    """
    target = Path(cache_dir) / f"{name}-{cache_key(Path(x_file), cfg, seed, inference_cfg)}.npy"
    if target.is_file():
        feats = np.load(target, mmap_mode="r")
        if feats.shape == (len(x), model.get_layer("gap").output.shape[-1]):
            log.info("features: cache hit %s", target)
            os.utime(target)  # recently used: pruning keeps the newest
            return np.asarray(feats)
    feats = extract(model, x, cfg.batch_size, desc=f"features {name}", inference_cfg=inference_cfg)
    with atomic_path(target) as tmp:
        np.save(tmp, feats)
    log.info("features: wrote %s %s", target, feats.shape)
    prune(Path(cache_dir), name)
    return feats


def prune(cache_dir: Path, name: str, keep: int = KEEP) -> list[Path]:
    """Delete all but the ``keep`` newest cached feature files of split ``name``; returns what was deleted."""
    return keep_newest(cache_dir.glob(f"{name}-*.npy"), keep, "features cache")


def for_head(model: keras.Model, params: config.Params) -> "Arrays":  # noqa: F821, UP037  (imported below)
    """Cached train/val features and labels: the head's whole training input when the backbone is frozen."""
    from pipeline.data.splits import load_split
    from pipeline.fit.training import Arrays

    out, cache_dir = {}, shared_cache(params.paths.features_cache)
    for name in ("train", "val"):
        split = load_split(params.paths.processed, name)
        x_file = Path(params.paths.processed) / name / "x.npy"
        feats = cached(model, split.x, x_file, params.model, params.base.seed, cache_dir, name, params.inference)
        out[name] = (feats, split.y)
    return Arrays(out["train"][0], out["train"][1], out["val"][0], out["val"][1])


def data_key(params: config.Params) -> str:
    """A short content hash of the train/val images, for naming things that depend on them."""
    h = hashlib.sha256()
    for name in ("train", "val"):
        _file_digest(Path(params.paths.processed) / name / "x.npy", h)
        _file_digest(Path(params.paths.processed) / name / "y.npy", h)
    return h.hexdigest()[:16]
