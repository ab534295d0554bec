"""The model file store: save and load a classifier with one clear message per way a file can be wrong, and the
decision threshold stored with it (the JSON beside a ``.keras`` file, an ``.h5`` file's own attribute, a logged
version's settings)."""
from __future__ import annotations

import zipfile
from pathlib import Path

import keras

from pipeline.errors import ModelError
from pipeline.io import atomic_path
from pipeline.model.network import PixelPreprocess

H5_THRESHOLD = "cifake_threshold"  # the HDF5 attribute an exported model keeps its decision threshold in


def save(model: keras.Model, path: str | Path, threshold: float | None = None) -> None:
    """Save atomically, without optimizer state (a third of the size; fine-tuning builds a fresh optimizer). An
    HDF5 file (``.h5``) keeps ``threshold`` inside it, so the exported model carries its own; a ``.keras`` file has
    its threshold in the JSON beside it."""
    if getattr(model, "optimizer", None) is not None:
        # The same layers and weights in an uncompiled model: keras.models.clone_model re-compiles its clone, so
        # the saved file would still carry (fresh) optimizer slots, 2x the trainable weights.
        model = keras.Model(model.input, model.output, name=model.name)
    with atomic_path(path) as tmp:
        model.save(tmp)
        if threshold is not None and tmp.suffix == ".h5":
            import h5py

            with h5py.File(tmp, "a") as f:
                f.attrs[H5_THRESHOLD] = float(threshold)


def stored_threshold(path: str | Path) -> float | None:
    """The threshold an HDF5 model file carries (see :func:`save`); None for other files and where none was kept."""
    if Path(path).suffix != ".h5":
        return None
    import h5py

    with h5py.File(path, "r") as f:
        value = f.attrs.get(H5_THRESHOLD)
    return None if value is None else float(value)


def load(path: str | Path) -> keras.Model:
    """Load a saved classifier with one clear message for each way the file can be wrong."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"no model file at {path}: run `dvc repro train` (or advtrain) first, or pass --model")
    if path.stat().st_size == 0 or (path.suffix == ".keras" and not zipfile.is_zipfile(path)):
        raise ModelError(f"{path} is not a Keras model file (empty, truncated or another format); re-run its stage")
    try:
        return keras.models.load_model(path, compile=False, custom_objects={"PixelPreprocess": PixelPreprocess})
    except ValueError as err:
        if "Lambda" in str(err):
            raise ModelError(f"{path} holds a Python Lambda layer; refusing to run code from a model file") from None
        raise ModelError(f"{path} could not be loaded as a cifake model ({err})") from None
    except (OSError, zipfile.BadZipFile, KeyError) as err:
        raise ModelError(f"{path} is damaged ({type(err).__name__}: {err}); re-run the stage that wrote it") from None

