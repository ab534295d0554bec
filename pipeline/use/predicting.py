"""Predictions for a folder of images: ``Image Name,Predicted Label`` with ``Real``/``Fake``.

Files are decoded exactly as preprocess does (:mod:`pipeline.data.images`); files that cannot be read are reported
and left out, and the run goes on for the rest.
"""
from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.classes import LABELS
from pipeline.data import filetree, images
from pipeline.errors import DataError
from pipeline.io import atomic_path

log = logging.getLogger(__name__)
COLUMNS = ("Image Name", "Predicted Label")


@dataclass
class FolderImages:
    x: np.ndarray  # uint8 N×32×32×3
    names: list[str]  # relative to the folder, forward slashes
    bad: list[tuple[str, str]]  # (name, reason)


@dataclass
class Listing:
    """The image files of a folder or .zip (below ``prefix``), listed before anything is decoded."""
    folder: Path
    prefix: str
    members: list[str]


def list_images(folder: Path, under: str = "") -> Listing:
    """Every image in ``folder`` (a folder or a .zip, searched recursively; only below ``under`` if given)."""
    folder = Path(folder)
    if not folder.is_dir() and not filetree.is_zip(folder):
        raise DataError(f"--input {folder}: not a folder or a .zip")
    prefix = f"{under.strip('/')}/" if under else ""
    with filetree.Tree(folder) as tree:
        files = [n for n in tree.names() if n.startswith(prefix) and images.is_image_name(n)]
    if not files:
        raise DataError(f"--input {folder / prefix}: no images (looked for "
                        f"{', '.join(sorted(images.IMAGE_SUFFIXES))})")
    return Listing(folder, prefix, files)


def decode_chunks(listing: Listing, resize: str, max_pixels: int, chunk: int = 4096) -> Iterator[FolderImages]:
    """The listed images decoded exactly as preprocess does, ``chunk`` files at a time, so memory stays bounded
    whatever the folder's size; names are relative to the folder (and to ``under``)."""
    with filetree.Tree(listing.folder) as tree, tqdm(total=len(listing.members), desc="predict", unit="img",
                                                    leave=False) as bar:
        for start in range(0, len(listing.members), chunk):
            pixels, names, bad = [], [], []
            for member in listing.members[start : start + chunk]:
                name = member.removeprefix(listing.prefix)
                try:
                    pixels.append(images.decode(tree.read(member), 32, resize, max_pixels))
                    names.append(name)
                except images.BadImage as err:
                    bad.append((name, err.reason))
                except filetree.Unreadable as err:  # a damaged zip entry: that file is lost, not the run
                    bad.append((name, images.BadImage("unreadable", err.why).reason))
            bar.update(len(pixels) + len(bad))
            yield FolderImages(np.stack(pixels) if pixels else np.zeros((0, 32, 32, 3), np.uint8), names, bad)


def read_folder(folder: Path, resize: str, max_pixels: int, under: str = "") -> FolderImages:
    """Every image in ``folder`` decoded at once (for small folders; :func:`predict_to_csv` streams)."""
    parts = list(decode_chunks(list_images(folder, under), resize, max_pixels))
    return FolderImages(np.concatenate([p.x for p in parts]), [n for p in parts for n in p.names],
                        [b for p in parts for b in p.bad])


@dataclass
class Summary:
    """What a scoring run (predict, Spark) did: the images scored, how many of them were called Fake, and the
    ``(name, reason)`` of each image it could not score."""
    images: int = 0
    fake: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def predict_to_csv(predict: Callable[[np.ndarray], np.ndarray], listing: Listing, resize: str, max_pixels: int,
                   threshold: float, target: Path, chunk: int = 4096) -> Summary:
    """Decode, predict and write ``Image Name,Predicted Label`` chunk by chunk (``predict`` maps uint8 images to
    P(FAKE)); the CSV appears at ``target`` only once every row is written."""
    summary = Summary()
    with atomic_path(target) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for part in decode_chunks(listing, resize, max_pixels, chunk):
            p_fake = predict(part.x) if len(part.x) else np.zeros(0, np.float32)
            writer.writerows(zip(part.names, labels(p_fake, threshold)))
            summary.images += len(part.names)
            summary.fake += int((p_fake >= threshold).sum())
            summary.skipped.extend(part.bad)
    return summary


def labels(p_fake: np.ndarray, threshold: float) -> list[str]:
    return [LABELS[int(p >= threshold)] for p in p_fake]


