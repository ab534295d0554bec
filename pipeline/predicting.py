"""Predictions for a folder of images: ``Image Name,Predicted Label`` with ``Real``/``Fake``.

Files are decoded exactly as preprocess does (:mod:`pipeline.images`); files that cannot be read are reported
and left out, and the run goes on for the rest.
"""
from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import filetree, images
from pipeline.classes import LABELS
from pipeline.errors import DataError, ModelError
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
    images: int
    fake: int
    bad: list[tuple[str, str]]


def predict_to_csv(predict: Callable[[np.ndarray], np.ndarray], listing: Listing, resize: str, max_pixels: int,
                   threshold: float, target: Path, chunk: int = 4096) -> Summary:
    """Decode, predict and write ``Image Name,Predicted Label`` chunk by chunk (``predict`` maps uint8 images to
    P(FAKE)); the CSV appears at ``target`` only once every row is written."""
    summary = Summary(0, 0, [])
    with atomic_path(target) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for part in decode_chunks(listing, resize, max_pixels, chunk):
            p_fake = predict(part.x) if len(part.x) else np.zeros(0, np.float32)
            writer.writerows(zip(part.names, labels(p_fake, threshold)))
            summary.images += len(part.names)
            summary.fake += int((p_fake >= threshold).sum())
            summary.bad.extend(part.bad)
    return summary


def labels(p_fake: np.ndarray, threshold: float) -> list[str]:
    return [LABELS[int(p >= threshold)] for p in p_fake]


def load_with_threshold(ref: str):
    """A model and the decision threshold stored with it: a logged version's settings (``models:/…``,
    ``runs:/…``), the JSON beside a model file (``models/model_adv.keras`` → ``models/model_adv.json``, as
    train and advtrain write them), or the one an HDF5 export carries (``models/ResNet50_CIFAKE_best.h5``). The
    threshold is None where none was stored."""
    if ref.startswith(("models:/", "runs:/")):
        from mlflow.exceptions import MlflowException

        from pipeline import serving

        try:
            served = serving.load_classifier(ref)
        except MlflowException as err:
            raise ModelError(f"--model {ref}: {err.message}") from None
        return served.model, served.settings.get("threshold")
    from pipeline.io import read_json
    from pipeline.model import load, stored_threshold

    model, info = load(ref), Path(ref).with_suffix(".json")
    return model, (read_json(info).get("threshold") if info.is_file() else stored_threshold(ref))


def resolve_threshold(override: float | None, stored: float | None, fallback: float) -> float:
    """The threshold to use: ``--threshold``, else the model's own, else ``fallback`` (with a warning)."""
    for value, source in ((override, "--threshold"), (stored, "the model's calibrated threshold")):
        if value is not None:
            if not 0.0 < value < 1.0:
                raise ModelError(f"{source} must lie in (0, 1) (got {value})")
            return float(value)
    log.warning("no threshold is stored with this model: using threshold.fixed = %s", fallback)
    return fallback
