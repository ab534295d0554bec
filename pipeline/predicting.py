"""Predictions for a folder of images: ``Image Name,Predicted Label`` with ``Real``/``Fake``.

Files are decoded exactly as preprocess does (:mod:`pipeline.images`); files that cannot be read are reported
and left out, and the run goes on for the rest.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import filetree, images
from pipeline.errors import DataError, ModelError
from pipeline.io import atomic_path

log = logging.getLogger(__name__)
COLUMNS = ("Image Name", "Predicted Label")
LABELS = ("Real", "Fake")  # index = class: FAKE is 1


@dataclass
class FolderImages:
    x: np.ndarray  # uint8 N×32×32×3
    names: list[str]  # relative to the folder, forward slashes
    bad: list[tuple[str, str]]  # (name, reason)


def read_folder(folder: Path, resize: str, max_pixels: int, under: str = "") -> FolderImages:
    """Every image in ``folder`` (a folder or a .zip, searched recursively; only below ``under`` if given), with
    names relative to it (and to ``under``)."""
    folder = Path(folder)
    if not folder.is_dir() and not filetree.is_zip(folder):
        raise DataError(f"--input {folder}: not a folder or a .zip")
    prefix = f"{under.strip('/')}/" if under else ""
    with filetree.Tree(folder) as tree:
        files = [n for n in tree.names() if n.startswith(prefix) and images.is_image_name(n)]
        if not files:
            raise DataError(f"--input {folder / prefix}: no images (looked for "
                            f"{', '.join(sorted(images.IMAGE_SUFFIXES))})")
        pixels, names, bad = [], [], []
        for member in tqdm(files, desc="decode", unit="img", leave=False):
            name = member.removeprefix(prefix)
            try:
                pixels.append(images.decode(tree.read(member), 32, resize, max_pixels))
                names.append(name)
            except images.BadImage as err:
                bad.append((name, err.reason))
    x = np.stack(pixels) if pixels else np.zeros((0, 32, 32, 3), np.uint8)
    return FolderImages(x, names, bad)


def labels(p_fake: np.ndarray, threshold: float) -> list[str]:
    return [LABELS[int(p >= threshold)] for p in p_fake]


def write_csv(names: list[str], predicted: list[str], target: Path) -> None:
    with atomic_path(target) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(zip(names, predicted))


def load_any_model(ref: str):
    """A model file path, or an MLflow models URI such as ``models:/cifake-resnet50@champion``."""
    if ref.startswith(("models:/", "runs:/")):
        import mlflow.keras
        from mlflow.exceptions import MlflowException

        import pipeline.model  # noqa: F401  registers the custom preprocessing layer for deserialisation

        try:
            return mlflow.keras.load_model(ref)
        except MlflowException as err:
            raise ModelError(f"--model {ref}: {err.message}") from None
    from pipeline.model import load

    return load(ref)
