"""The registered model as an MLflow pyfunc that takes images, so that

    mlflow models serve -m models:/cifake-resnet50@champion --env-manager local

answers ``POST /invocations`` with ``{"dataframe_records": [{"image": "<base64 of a PNG/JPEG/WebP/BMP file>"}, …]}``
or with pixel arrays, ``[{"pixels": [[[r, g, b], …], …]}, …]`` (H×W×3, 0–255). Every row is decoded and resized
exactly as preprocess does (:func:`pipeline.data.images.decode`) and answered with ``label`` (Real/Fake), ``p_fake`` and
``error``: a row that cannot be read gets its reason there, the other rows their answers, and the server lives on.
Every row in gets one row out, also a row with neither field beside rows that have one. A request in which no row
has either field (an empty request among them) is refused whole, HTTP 400: MLflow's schema check drops the fields
the signature does not name, and with them every row, before the model sees the request. A request over
:data:`MAX_RECORDS` rows or :data:`MAX_REQUEST_BYTES` of image data is refused whole too (HTTP 400), before any
decoding; the serving process's environment may set both (``CIFAKE_SERVING_MAX_RECORDS``,
``CIFAKE_SERVING_MAX_BYTES``).

The version's Keras file and its settings (threshold, resize, max_pixels) travel as artifacts, the ``pipeline``
package as code, so the model serves wherever it is loaded. :func:`load` gets the Keras model back.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from pipeline import config
from pipeline.classes import LABELS
from pipeline.data import images
from pipeline.errors import ModelError

log = logging.getLogger(__name__)
KERAS_ARTIFACT, SETTINGS_ARTIFACT = "keras_model", "settings"
# What one request may carry. MLflow's scoring server reads and parses any body before the model sees it (it has no
# size limit of its own), so these bound the work and memory a request causes past parsing, not the read itself.
MAX_RECORDS = 1024
MAX_REQUEST_BYTES = 16 * 2**20  # base64 characters of the images, or one byte per pixel value of the arrays


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer (got {value!r})") from None
    if n <= 0:
        raise ValueError(f"{name} must be a positive integer (got {value!r})")
    return n


def _request_bytes(row: dict) -> int:
    """What a row weighs against :data:`MAX_REQUEST_BYTES`, read from its lengths alone (nothing decoded)."""
    image, pixels = row.get("image"), row.get("pixels")
    if isinstance(image, str):
        return len(image)
    try:
        return len(pixels) * len(pixels[0]) * len(pixels[0][0])
    except (TypeError, IndexError, KeyError):  # no array, or not H×W×3: the row's own error says so
        return 0


class ImageClassifier(mlflow.pyfunc.PythonModel):
    # The inference engine: auto (OpenVINO on a CPU, TensorFlow on a GPU) unless the serving process's environment
    # names one in CIFAKE_INFERENCE_ENGINE (openvino | tensorflow).
    inference_cfg = config.Inference()

    def load_context(self, context) -> None:
        from pipeline.model import store

        self.model = store.load(context.artifacts[KERAS_ARTIFACT])
        self.settings = json.loads(Path(context.artifacts[SETTINGS_ARTIFACT]).read_text())
        self.inference_cfg = config.Inference(engine=os.environ.get("CIFAKE_INFERENCE_ENGINE") or "auto")
        self.max_records = _env_int("CIFAKE_SERVING_MAX_RECORDS", MAX_RECORDS)
        self.max_bytes = _env_int("CIFAKE_SERVING_MAX_BYTES", MAX_REQUEST_BYTES)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from pipeline.model.inference import probabilities

        threshold = float((params or {}).get("threshold") or self.settings["threshold"])
        if isinstance(model_input, pd.DataFrame):
            if not len(model_input.columns):
                self._refuse_no_fields(model_input)
            rows = model_input.to_dict("records")
        else:
            rows = list(model_input)
        self._check_size(rows)
        pixels, errors = [], []
        for row in rows:
            try:
                pixels.append(self._decode(row))
                errors.append("")
            except ValueError as err:
                pixels.append(None)
                errors.append(str(err))
        read = [i for i, x in enumerate(pixels) if x is not None]
        p: list[float | None] = [None] * len(rows)
        if read:
            for i, v in zip(read, probabilities(self.model, np.stack([pixels[i] for i in read]), self.inference_cfg)):
                p[i] = float(v)
        # object columns: a row that failed answers null (pandas' own string and float columns would say NaN, which
        # strict JSON parsers reject)
        return pd.DataFrame({
            "label": pd.Series([None if v is None else LABELS[int(v >= threshold)] for v in p], dtype=object),
            "p_fake": pd.Series(p, dtype=object),
            "error": errors})

    @staticmethod
    def _refuse_no_fields(frame: pd.DataFrame) -> None:
        """MLflow's schema check drops the fields the signature does not name, and a frame left with no column
        comes with no rows (records that all lack image and pixels arrive as an empty frame, exactly as an empty
        request does): refuse it whole, since the records cannot be answered one by one."""
        from mlflow.exceptions import MlflowException

        raise MlflowException.invalid_parameter_value(
            f"no record carries 'image' (base64 of an image file) or 'pixels' (H×W×3 values 0-255) ({len(frame)} "
            "rows reached the model: fields with other names are dropped before it, and so is a record list with "
            "none of these fields; an empty request gets this answer too)")

    def _check_size(self, rows: list[dict]) -> None:
        """Refuse a request over the limits whole (HTTP 400 from the scoring server), before any decoding."""
        from mlflow.exceptions import MlflowException

        max_records = getattr(self, "max_records", MAX_RECORDS)  # versions unpickled without load_context
        max_bytes = getattr(self, "max_bytes", MAX_REQUEST_BYTES)
        if len(rows) > max_records:
            raise MlflowException.invalid_parameter_value(
                f"a request carries at most {max_records} records (got {len(rows)}): send them in several requests")
        weight = sum(_request_bytes(row) for row in rows)
        if weight > max_bytes:
            raise MlflowException.invalid_parameter_value(
                f"a request carries at most {max_bytes} bytes of images (got {weight}): send them in several "
                "requests, or smaller images")

    def _decode(self, row: dict) -> np.ndarray:
        resize, max_pixels = self.settings["resize"], self.settings["max_pixels"]
        image, pixels = row.get("image"), row.get("pixels")
        if isinstance(image, str) and image:
            try:
                data = base64.b64decode(image, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("image: not valid base64") from None
            try:
                return images.decode(data, 32, resize, max_pixels)
            except images.BadImage as err:
                raise ValueError(f"image: {err.reason}") from None
        if pixels is not None and not (isinstance(pixels, float) and np.isnan(pixels)):  # NaN: a missing cell
            return _from_pixels(pixels, resize, max_pixels)
        raise ValueError("each row needs 'image' (base64 of an image file) or 'pixels' (H×W×3 values 0-255)")


def _from_pixels(pixels, resize: str, max_pixels: int) -> np.ndarray:
    """A pixel array goes through the same decoder as a file (as a lossless PNG), so both paths agree exactly."""
    from PIL import Image

    try:
        x = np.asarray(pixels, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("pixels: not a numeric H×W×3 array") from None
    if x.ndim != 3 or x.shape[2] != 3 or 0 in x.shape:
        raise ValueError(f"pixels: expected H×W×3, got shape {x.shape}")
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 255:
        raise ValueError("pixels: values must lie in 0-255")
    buffer = io.BytesIO()
    Image.fromarray(np.rint(x).astype(np.uint8), "RGB").save(buffer, format="PNG")
    try:
        return images.decode(buffer.getvalue(), 32, resize, max_pixels)
    except images.BadImage as err:
        raise ValueError(f"pixels: {err.reason}") from None


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image", required=False),
                       ColSpec(Array(Array(Array("long"))), "pixels", required=False)]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "p_fake"), ColSpec("string", "error")]),
        params=ParamSchema([ParamSpec("threshold", "double", 0.0)]),  # 0: the version's own threshold
    )


def input_example(image: np.ndarray) -> pd.DataFrame:
    """One request row as ``mlflow models serve`` takes it: an H×W×3 uint8 image as a base64 PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8), "RGB").save(buffer, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode("ascii")]})


def log_version(model_path: str | Path, settings: dict, name: str, registered_name: str | None,
                example: np.ndarray | None = None) -> dict[str, str]:
    """Log the saved Keras file at ``model_path`` as an :class:`ImageClassifier` with its ``settings`` (the
    threshold among them) and the ``pipeline`` package as code, register a new version, return the ids (the
    logged model's ``model_id`` among them, for metrics that score it). ``example``: one image, stored as the
    version's input example (MLflow checks that the model serves it)."""
    from importlib.metadata import PackageNotFoundError, version

    import pipeline

    requirements = []  # stated, not inferred: inference loads the model in a subprocess (slow) and then guesses
    for dist in ("tensorflow-cpu", "keras", "numpy", "openvino", "pandas", "pillow", "pydantic", "pyyaml", "tqdm"):
        try:
            requirements.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:  # tensorflow (a GPU install) instead of tensorflow-cpu
            if dist == "tensorflow-cpu":
                requirements.append(f"tensorflow=={version('tensorflow')}")
    with tempfile.TemporaryDirectory() as tmp:
        settings_file = Path(tmp) / "settings.json"
        settings_file.write_text(json.dumps(settings, indent=2))
        info = mlflow.pyfunc.log_model(
            name=name, python_model=ImageClassifier(), signature=signature(), registered_model_name=registered_name,
            artifacts={KERAS_ARTIFACT: str(model_path), SETTINGS_ARTIFACT: str(settings_file)},
            code_paths=[str(Path(pipeline.__file__).parent)], pip_requirements=requirements,
            input_example=None if example is None else input_example(example))
    mlflow.log_params({"threshold": settings["threshold"]})
    out = {"model_uri": info.model_uri, "run_id": mlflow.active_run().info.run_id, "model_id": info.model_id}
    if registered_name:
        out["registered_model"] = registered_name
        out["version"] = str(info.registered_model_version)
    return out


def load_classifier(uri: str):
    """The :class:`ImageClassifier` of a logged version (``models:/…`` or ``runs:/…``), its Keras model in
    ``.model`` and its settings in ``.settings``. A version logged in Keras's own flavour (before this module)
    comes back with empty settings."""
    from mlflow.exceptions import MlflowException

    import pipeline.model.network  # noqa: F401  registers the custom preprocessing layer for deserialisation

    loaded = mlflow.pyfunc.load_model(uri)
    try:
        return loaded.unwrap_python_model()
    except MlflowException:  # not a custom pyfunc: a Keras-flavoured version
        from mlflow import keras as keras_flavour

        legacy = ImageClassifier()
        legacy.model, legacy.settings = keras_flavour.load_model(uri), {}
        return legacy


def settings(threshold: float, preprocess) -> dict:
    """What a served version needs besides its weights: its threshold, and how preprocess decodes images."""
    return {"threshold": float(threshold), "resize": preprocess.resize, "max_pixels": preprocess.max_pixels}


def load_with_threshold(ref: str):
    """A model and the decision threshold stored with it: a logged version's settings (``models:/…``,
    ``runs:/…``), the JSON beside a model file (``models/model_adv.keras`` → ``models/model_adv.json``, as
    train and advtrain write them), or the one an HDF5 export carries (``models/ResNet50_CIFAKE_best.h5``). The
    threshold is None where none was stored."""
    if ref.startswith(("models:/", "runs:/")):
        from mlflow.exceptions import MlflowException

        try:
            served = load_classifier(ref)
        except MlflowException as err:
            raise ModelError(f"--model {ref}: {err.message}") from None
        return served.model, served.settings.get("threshold")
    from pipeline.io import read_json
    from pipeline.model.store import load, stored_threshold

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
