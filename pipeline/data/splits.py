"""The processed splits preprocess writes and every later stage reads (``processed/{train,val,test}/``), and seeded
stratified subsets of them."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    x: np.ndarray  # uint8 N×S×S×3
    y: np.ndarray  # uint8 N, FAKE = 1
    names: list[str]

    def __len__(self) -> int:
        return len(self.y)


def load_split(processed_dir: Path, name: str, mmap: bool = True) -> Split:
    """Read one split written by :func:`preprocess`; ``mmap`` maps ``x`` read-only instead of loading it."""
    if name not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
    folder = Path(processed_dir) / name
    try:
        x = np.load(folder / "x.npy", mmap_mode="r" if mmap else None)
        y = np.load(folder / "y.npy")
        names = json.loads((folder / "names.json").read_text())
    except FileNotFoundError as err:
        missing = Path(err.filename).name
        raise DataError(f"{folder}: missing {missing}; run the preprocess stage (dvc repro preprocess)") from None
    if not (len(x) == len(y) == len(names)) or x.dtype != np.uint8 or x.ndim != 4:
        raise DataError(
            f"{folder}: inconsistent split (x {x.shape} {x.dtype}, y {y.shape}, {len(names)} names); rerun preprocess"
        )
    return Split(x, y, names)


def stratified_subset(y: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded, class-stratified subset of ``n`` images (all of them when ``n`` is None)."""
    if n is None or n >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    share = n / len(y)
    parts = [rng.permutation(np.flatnonzero(y == c))[: max(1, round(share * (y == c).sum()))] for c in np.unique(y)]
    return np.sort(np.concatenate(parts))
