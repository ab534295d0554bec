"""Preprocess: CIFAKE raw files -> uint8 arrays per split, and the loader for them.

Output (``processed/{train,val,test}/``): ``x.npy`` uint8 N×S×S×3, ``y.npy`` uint8 N (REAL=0, FAKE=1),
``names.json`` (each image's path relative to its raw split root, e.g. ``"FAKE/0000 (2).jpg"``; val images come
from ``raw/train``). Every file is decoded exactly once; bad files are skipped and reported.
"""
from __future__ import annotations

import json
import multiprocessing
import os
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.pool import Pool
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from pipeline import config
from pipeline.classes import CLASSES
from pipeline.data import duplicates, filetree, images
from pipeline.errors import DataError
from pipeline.io import atomic_dir

RAW_SPLITS = ("train", "test")
IMAGE_SIZE = 32  # CIFAKE's size; the model resizes itself (model.image_size)
# Below this many files, starting worker processes costs more than it saves (bench/README.md#where-the-time-goes).
POOL_MIN_FILES = 4000
_CHUNK = 256  # files per worker task: amortises inter-process overhead, keeps order cheap to preserve


@dataclass
class _Listing:
    """The files of one split: names relative to the split ("FAKE/1.jpg") and their labels, in a fixed order."""

    tree: str  # the raw folder or zip
    split: str  # "train" or "test": the names live under "<split>/" in the tree
    names: list[str]
    labels: np.ndarray  # uint8

    def subset(self, keep: np.ndarray) -> _Listing:
        return _Listing(self.tree, self.split, [n for n, k in zip(self.names, keep) if k], self.labels[keep])


def _layout(raw: Path) -> str:
    return f"{raw}: {{train,test}}/{{REAL,FAKE}}/*.jpg"


def _list_raw(raw: Path) -> dict[str, _Listing]:
    if not raw.exists():
        raise DataError(f"{raw}: not found; run the fetch stage (dvc repro fetch) or check paths.raw")
    with filetree.Tree(raw) as tree:
        files = tree.names()
    out: dict[str, _Listing] = {}
    for split in RAW_SPLITS:
        names: list[str] = []
        labels: list[int] = []
        for label, cls in enumerate(CLASSES):
            prefix = f"{split}/{cls}/"
            found = [f.removeprefix(f"{split}/") for f in files if f.startswith(prefix)]
            if not found:
                raise DataError(
                    f"{raw}: no files in {split}/{cls}; expected the CIFAKE layout {_layout(raw)} (check "
                    "paths.raw, or run the fetch stage: dvc repro fetch)")
            names.extend(found)
            labels.extend([label] * len(found))
        out[split] = _Listing(str(raw), split, names, np.array(labels, dtype=np.uint8))
    return out


def stratified_val_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the validation share, drawn per class with a seeded permutation.

    Each class gets ``round(n * fraction)`` validation files, at least 1 and at most n - 1, so both classes are
    in both parts.
    """
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for label, cls in enumerate(CLASSES):
        idx = np.flatnonzero(labels == label)
        if len(idx) < 2:
            raise DataError(f"train/{cls}: {len(idx)} file(s); need at least 2 to split off validation")
        n_val = min(max(1, round(len(idx) * fraction)), len(idx) - 1)
        mask[rng.permutation(idx)[:n_val]] = True
    return mask


class _NpyWriter:
    """Append rows to a ``.npy`` whose length is known only at the end (a context manager).

    Plain buffered writes rather than ``open_memmap``: pages written through a memmap count in this process's RSS
    until the kernel evicts them, so peak memory would grow with the dataset. NumPy pads the header so the first
    axis can grow to 21 digits; the header is rewritten in place with the final count on a clean exit.
    """

    def __init__(self, path: Path, row_shape: tuple[int, ...]) -> None:
        self._row_shape = row_shape
        self.count = 0
        self._fp: BinaryIO = open(path, "wb", buffering=1 << 20)  # noqa: SIM115 (closed in __exit__)
        self._header_len = self._write_header()

    def _write_header(self) -> int:
        header = {"descr": "|u1", "fortran_order": False, "shape": (self.count, *self._row_shape)}
        np.lib.format.write_array_header_1_0(self._fp, header)
        return self._fp.tell()

    def append(self, rows: np.ndarray) -> None:
        """Append a block of rows (along the first axis)."""
        if rows.shape[1:] != self._row_shape or rows.dtype != np.uint8:
            raise ValueError(f"rows {rows.shape} {rows.dtype}, expected (n, {self._row_shape}) uint8")
        self._fp.write(np.ascontiguousarray(rows).data)
        self.count += len(rows)

    def __enter__(self) -> _NpyWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with self._fp:
            if exc_type is None:
                self._fp.seek(0)
                if self._write_header() != self._header_len:  # cannot happen with NumPy's growth padding
                    raise RuntimeError("npy header changed length")


@dataclass
class _Tally:
    """What the report says about the decode, accumulated over the splits."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    bad: list[dict[str, str]] = field(default_factory=list)
    bad_kinds: Counter[str] = field(default_factory=Counter)
    converted: Counter[str] = field(default_factory=Counter)
    resized: int = 0


Outcome = tuple[str, bool] | images.BadImage  # (source mode, resized) for a good image


def _decode_one(tree: filetree.Tree, name: str, resize: str, max_pixels: int) -> images.Decoded | images.BadImage:
    if not images.is_image_name(name):
        suffix = os.path.splitext(name)[1] or "(none)"
        return images.BadImage("not an image", f"suffix {suffix!r} is not one of {sorted(images.IMAGE_SUFFIXES)}")
    try:
        return images.decode_with_info(tree.read(name), IMAGE_SIZE, resize, max_pixels)  # type: ignore[arg-type]
    except images.BadImage as bad:
        return bad
    except filetree.Unreadable as err:  # a damaged zip entry: that file is lost (and counted), not the dataset
        return images.BadImage("unreadable", err.why)


def _decode_chunk(args: tuple[str, str, list[str], str, int]) -> tuple[np.ndarray, list[Outcome]]:
    """Decode a run of files; good pixels come back stacked in one array (one pickle, not hundreds)."""
    tree_path, split, names, resize, max_pixels = args
    tree = filetree.cached(tree_path)  # opened once per worker process
    pixels, outcomes = [], []
    for name in names:
        res = _decode_one(tree, f"{split}/{name}", resize, max_pixels)
        if isinstance(res, images.BadImage):
            outcomes.append(res)
        else:
            pixels.append(res.pixels)
            outcomes.append((res.mode, res.resized))
    stacked = np.stack(pixels) if pixels else np.empty((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return stacked, outcomes


def _default_workers(n_files: int) -> int:
    return min(len(os.sched_getaffinity(0)), 8) if n_files >= POOL_MIN_FILES else 1


def _decode_split(split: str, listing: _Listing, folder: Path, cfg: config.Preprocess, pool: Pool | None,
                  bar: tqdm, tally: _Tally) -> None:
    """Decode one split's files in order into ``folder/{x.npy,y.npy,names.json}``; bad files go to ``tally``."""
    folder.mkdir()
    keep = np.zeros(len(listing.names), dtype=bool)
    starts = range(0, len(listing.names), _CHUNK)
    tasks = ((listing.tree, listing.split, listing.names[i : i + _CHUNK], cfg.resize, cfg.max_pixels) for i in starts)
    results = pool.imap(_decode_chunk, tasks) if pool else map(_decode_chunk, tasks)  # both keep the order
    with _NpyWriter(folder / "x.npy", (IMAGE_SIZE, IMAGE_SIZE, 3)) as writer:
        for start, (pixels, outcomes) in zip(starts, results):
            writer.append(pixels)
            for i, out in enumerate(outcomes, start):
                if isinstance(out, images.BadImage):
                    tally.bad.append({"file": f"{listing.split}/{listing.names[i]}", "split": split,
                                      "reason": out.reason})
                    tally.bad_kinds[out.kind] += 1
                else:
                    keep[i] = True
                    mode, was_resized = out
                    tally.converted[mode] += mode != "RGB"
                    tally.resized += was_resized
            bar.update(len(outcomes))
    good = listing.subset(keep)
    np.save(folder / "y.npy", good.labels)
    (folder / "names.json").write_text(json.dumps(good.names, ensure_ascii=False))
    per_class = np.bincount(good.labels, minlength=len(CLASSES))
    tally.counts[split] = {cls: int(per_class[i]) for i, cls in enumerate(CLASSES)}


def _check(tally: _Tally, n_files: int, max_bad_fraction: float) -> None:
    bad, fraction = tally.bad, len(tally.bad) / n_files
    first = "; ".join(f"{b['file']} ({b['reason']})" for b in bad[:5])
    if fraction > max_bad_fraction:
        raise DataError(
            f"{len(bad)} of {n_files} files ({fraction:.2%}) cannot be used, more than "
            f"preprocess.max_bad_fraction = {max_bad_fraction}. First: {first}. By kind: {dict(tally.bad_kinds)}. "
            f"Fix or remove them, or raise preprocess.max_bad_fraction "
            f"(e.g. -S preprocess.max_bad_fraction={min(1.0, round(fraction + 0.005, 3))})."
        )
    empty = [f"{s}/{c}" for s, per in tally.counts.items() for c, n in per.items() if n == 0]
    if empty:
        raise DataError(f"no usable images left in {', '.join(empty)}; {len(bad)} bad file(s), first: {first}")


# (the split that loses an image under ``duplicates: drop``, the split it is compared with)
_LEAK_PAIRS = (("train", "val"), ("train", "test"), ("val", "test"))


def _near_duplicates(folder: Path, cfg: config.Preprocess, tally: _Tally) -> dict:
    """Count the images of each split that have a near-duplicate in a later split (:mod:`pipeline.data.duplicates`);
    with ``cfg.duplicates == "drop"``, remove them from the earlier split, so test stays whole and comparable."""
    found: dict[str, np.ndarray] = {}
    report: dict = {"method": "cosine of 8x8 grey signatures, as is or mirrored; exact copies by hash",
                    "similarity": cfg.duplicate_similarity, "action": cfg.duplicates}
    for a, b in _LEAK_PAIRS:
        xa, xb = (np.load(folder / s / "x.npy", mmap_mode="r") for s in (a, b))
        names_a, names_b = (json.loads((folder / s / "names.json").read_text()) for s in (a, b))
        m = duplicates.find(xa, xb, cfg.duplicate_similarity)
        report[f"{a}_in_{b}"] = len(m.query)
        report[f"{a}_in_{b}_examples"] = [{a: names_a[i], b: names_b[j], "similarity": round(float(s), 4)}
                                           for i, j, s in list(zip(m.query, m.reference, m.similarity))[:5]]
        found[a] = np.union1d(found.get(a, np.array([], np.int64)), m.query)
    if cfg.duplicates == "drop":
        for split, drop in found.items():
            _drop_rows(folder / split, drop)
            y = np.load(folder / split / "y.npy")
            tally.counts[split] = {cls: int(n) for cls, n in zip(CLASSES, np.bincount(y, minlength=len(CLASSES)))}
        report["dropped"] = {split: len(drop) for split, drop in found.items()}
    return report


def _drop_rows(split_dir: Path, rows: np.ndarray) -> None:
    keep = np.setdiff1d(np.arange(len(np.load(split_dir / "y.npy"))), rows)
    x, y = np.load(split_dir / "x.npy")[keep], np.load(split_dir / "y.npy")[keep]
    names = json.loads((split_dir / "names.json").read_text())
    np.save(split_dir / "x.npy", x)
    np.save(split_dir / "y.npy", y)
    (split_dir / "names.json").write_text(json.dumps([names[i] for i in keep], ensure_ascii=False))


def preprocess(
    raw_dir: Path,
    out_dir: Path,
    cfg: config.Preprocess,
    seed: int,
    progress: bool = True,
    workers: int | None = None,
) -> dict:
    """Decode ``raw_dir`` (CIFAKE layout, a folder or a zip) into ``out_dir/{train,val,test}``; return the report.

    The train file list is split into train/val (stratified, seeded) before decoding, so each file is decoded
    once. Output goes to a temporary folder swapped in whole at the end: a failure or interrupt leaves the previous
    output (or none). ``workers`` processes decode in parallel (default: all cores when there are at least
    ``POOL_MIN_FILES`` files), order preserved, output identical to ``workers=1``.
    Raises :class:`DataError` on a wrong layout or when more than ``cfg.max_bad_fraction`` of files are bad.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    listed = _list_raw(raw_dir)
    is_val = stratified_val_mask(listed["train"].labels, cfg.val_fraction, seed)
    splits = {"train": listed["train"].subset(~is_val), "val": listed["train"].subset(is_val), "test": listed["test"]}
    n_files = sum(len(v.names) for v in splits.values())
    workers = workers or _default_workers(n_files)
    tally = _Tally()
    # spawn, not fork: the parent may hold threads (TF, tqdm's monitor) that a forked child would inherit broken
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        with atomic_dir(out_dir) as tmp, tqdm(total=n_files, desc="decode", unit="img", disable=not progress) as bar:
            for split, listing in splits.items():
                _decode_split(split, listing, tmp / split, cfg, pool, bar, tally)
            _check(tally, n_files, cfg.max_bad_fraction)  # raising here discards the temporary folder
            leaks = _near_duplicates(tmp, cfg, tally)
    finally:
        if pool:
            pool.terminate()

    return {
        "raw": str(raw_dir),
        "image_size": IMAGE_SIZE,
        "resize": cfg.resize,
        "val_fraction": cfg.val_fraction,
        "seed": seed,
        "files": n_files,
        "counts": tally.counts,
        "images": sum(sum(c.values()) for c in tally.counts.values()),
        "bad_fraction": round(len(tally.bad) / n_files, 6),
        "bad_by_kind": dict(sorted(tally.bad_kinds.items())),
        "bad": tally.bad,
        "converted": {f"mode {m}": n for m, n in sorted(tally.converted.items()) if n},
        "resized": tally.resized,
        "near_duplicates": leaks,
    }
