"""Serving through MLflow: the registered version is an image-serving pyfunc. In process: encoded images (PNG, JPEG,
WebP, BMP) as base64 and pixel arrays give the predict tool's answers, a broken row gets its own error. Over HTTP:
``mlflow models serve -m models:/NAME@champion --env-manager local`` on loopback answers real images as
``src/predict.py`` does on the same files, and lives through a broken one."""
from __future__ import annotations

import base64
import io
import json
import os
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

from pipeline import config
from pipeline.judge import registry
from pipeline.model import inference, serving, store
from pipeline.use import predicting
from tests.use.test_predict import messy_folder, noise, read_csv, run_predict  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[2]
PREPROCESS = config.load(ROOT / "params.yaml").preprocess
NAME = "cifake-serving-test"
SETTINGS = {"threshold": 0.5, "resize": PREPROCESS.resize, "max_pixels": PREPROCESS.max_pixels}


def encoded(image: np.ndarray, fmt: str) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def served(tmp_path: Path, mlflow_store, tiny_model_file: Path) -> str:
    """The tiny model logged as the pipeline logs a version, registered, holding @champion."""
    with mlflow.start_run():
        info = serving.log_version(tiny_model_file, SETTINGS, "model", NAME)
    MlflowClient().set_registered_model_alias(NAME, registry.CHAMPION, info["version"])
    return f"models:/{NAME}@{registry.CHAMPION}"


def test_a_version_is_logged_with_its_signature_settings_and_code(served: str) -> None:
    info = mlflow.models.get_model_info(served)
    inputs = {c["name"]: c for c in info.signature.inputs.to_dict()}
    assert inputs["image"]["type"] == "string" and not inputs["image"]["required"]
    assert inputs["pixels"]["type"] == "array" and not inputs["pixels"]["required"]
    assert [c["name"] for c in info.signature.outputs.to_dict()] == ["label", "p_fake", "error"]
    assert serving.load_classifier(served).settings == SETTINGS
    version = MlflowClient().get_model_version_by_alias(NAME, registry.CHAMPION)
    assert MlflowClient().get_run(version.run_id).data.params["threshold"] == str(SETTINGS["threshold"])


def test_every_image_format_and_pixel_arrays_answer_like_the_predict_tool(served: str, tiny_model) -> None:
    bright, dark = noise(32, 32, 156, 256, 1), noise(40, 50, 0, 100, 2)  # dark is resized, as preprocess would
    rows = [{"image": encoded(bright, fmt)} for fmt in ("PNG", "JPEG", "WEBP", "BMP")]
    rows.append({"image": encoded(dark, "PNG")})
    loaded = mlflow.pyfunc.load_model(served)
    answer = loaded.predict(pd.DataFrame(rows))
    from_pixels = loaded.predict(pd.DataFrame([{"pixels": dark.tolist()}]))  # one kind of record per request

    decoded = [predicting.images.decode(base64.b64decode(r["image"]), 32, PREPROCESS.resize, PREPROCESS.max_pixels)
               for r in rows]
    p = inference.predict_proba(tiny_model.model, np.stack(decoded))
    assert list(answer.columns) == ["label", "p_fake", "error"]
    assert (answer["error"] == "").all(), answer["error"].tolist()
    np.testing.assert_allclose(answer["p_fake"].astype(float), p, atol=1e-6)
    assert answer["label"].tolist() == ["Fake"] * 4 + ["Real"]
    # A pixel array is decoded exactly as its PNG file is; the two requests differ in batch size, and OpenVINO's
    # float32 kernels (like oneDNN's) may sum in another order for another batch: equal to float32 rounding.
    assert from_pixels["p_fake"][0] == pytest.approx(answer["p_fake"][4], rel=1e-4, abs=1e-12)
    # the version's threshold, or one given with the request: below a row's P(FAKE) calls it Fake, above calls it
    # Real. Grey noise (between the tiny model's dark and bright) gives P(FAKE) strictly inside (0, 1) for one row.
    grey = pd.DataFrame([{"image": encoded(noise(32, 32, lo, lo + 100, lo), "PNG")} for lo in range(104, 128, 2)])
    p_grey = loaded.predict(grey)["p_fake"].astype(float).to_numpy()
    i = int(np.argmin(np.abs(p_grey - 0.5)))
    assert 1e-3 < p_grey[i] < 1 - 1e-3, p_grey
    row = grey.iloc[[i]]
    assert loaded.predict(row, params={"threshold": p_grey[i] / 2})["label"][0] == "Fake"
    assert loaded.predict(row, params={"threshold": (p_grey[i] + 1) / 2})["label"][0] == "Real"


def test_a_version_answers_at_its_own_stored_threshold(mlflow_store, small_model_file) -> None:
    from tests.conftest import cue_images, threshold_that_matters

    images = cue_images(12, seed=3)[0]
    rows = pd.DataFrame([{"pixels": img.tolist()} for img in images])
    p = inference.predict_proba(store.load(small_model_file), images)  # graded, and a few MB to log and load
    stored = threshold_that_matters(p)  # labels otherwise than 0.5 on at least two images
    answers = {}
    for threshold in (stored, 0.5):
        with mlflow.start_run():
            info = serving.log_version(small_model_file, {**SETTINGS, "threshold": threshold}, "model", NAME)
        answer = mlflow.pyfunc.load_model(f"models:/{NAME}/{info['version']}").predict(rows)
        np.testing.assert_allclose(answer["p_fake"].astype(float), p, rtol=1e-4, atol=1e-6)
        answers[threshold] = answer["label"].tolist()
    assert answers[stored] == predicting.labels(p, stored)
    assert answers[0.5] == predicting.labels(p, 0.5) != answers[stored]


def test_a_version_logged_through_a_tracking_server_comes_back_from_it(mlflow_store, mlflow_server, monkeypatch,
                                                                       tiny_model, tiny_model_file) -> None:
    """As train and advtrain log against a team's server: the weights travel through its artifact proxy, the server
    checks the version's source, and a client that knows only the server loads the model and its threshold back."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment(f"serving-{os.getpid()}-{time.monotonic_ns()}")
    with mlflow.start_run():
        info = serving.log_version(tiny_model_file, {**SETTINGS, "threshold": 0.25}, "model", NAME)
    assert MlflowClient().get_model_version(NAME, info["version"]).source == f"models:/{info['model_id']}"
    assert MlflowClient().get_logged_model(info["model_id"]).artifact_location.startswith("mlflow-artifacts:")
    loaded, threshold = serving.load_with_threshold(f"models:/{NAME}/{info['version']}")
    want = inference.predict_proba(tiny_model.model, tiny_model.x)
    assert threshold == 0.25 and np.array_equal(inference.predict_proba(loaded, tiny_model.x), want)


def test_a_broken_record_gets_its_own_error_and_the_rest_their_answers(served: str) -> None:
    rows = [{"image": encoded(noise(32, 32, 156, 256, 1), "PNG")},
            {"image": base64.b64encode(b"\x89PNG\r\n\x1a\n not really").decode()},
            {"image": "%%% not base64 %%%"}]
    loaded = mlflow.pyfunc.load_model(served)
    answer = loaded.predict(pd.DataFrame(rows))
    assert answer["label"].tolist() == ["Fake", None, None]
    errors = answer["error"].tolist()
    assert errors[0] == "" and errors[1].startswith("image:") and "base64" in errors[2]
    assert answer["p_fake"][1:].tolist() == [None, None]
    out_of_range = loaded.predict(pd.DataFrame([{"pixels": [[[300, 0, 0]]]}, {"pixels": [[[0, 0, 0]]]}]))
    assert "0-255" in out_of_range["error"][0] and out_of_range["error"][1] == ""
    with pytest.raises(MlflowException, match="schema"):
        loaded.predict(pd.DataFrame([{"pixels": [[1, 2], [3, 4]]}]))


def test_the_keras_model_comes_back_out_of_the_version(served: str, tiny_model) -> None:
    want = inference.predict_proba(tiny_model.model, tiny_model.x)
    assert np.array_equal(inference.predict_proba(serving.load_classifier(served).model, tiny_model.x), want)
    loaded, threshold = serving.load_with_threshold(served)
    assert np.array_equal(inference.predict_proba(loaded, tiny_model.x), want) and threshold == SETTINGS["threshold"]


@pytest.mark.slow  # the server imports TensorFlow and loads the model: ~20-40 s
def test_mlflow_models_serve_answers_real_images_like_predict(served: str, mlflow_store, messy_folder: Path,  # noqa: F811
                                                              tmp_path: Path, tiny_model_file: Path) -> None:
    from bench import load

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store.uri, "PYTHONPATH": str(ROOT)}
    with load.serve(served, env, tmp_path / "serve.log") as server:
        files = sorted(p for p in messy_folder.rglob("*") if p.is_file() and p.suffix.lower() != ".txt")
        records = [{"image": base64.b64encode(p.read_bytes()).decode()} for p in files]

        def post(body: dict) -> tuple[int, dict]:
            return load.post(server.url, json.dumps(body).encode())[:2]

        status, body = post({"dataframe_records": records})
        assert status == 200, body
        assert "NaN" not in json.dumps(body)  # strict JSON: a failed row answers null
        answers = body["predictions"]
        assert len(answers) == len(files)

        csv_out = tmp_path / "predict.csv"
        proc = run_predict("--input", str(messy_folder), "--output", str(csv_out), "--model", str(tiny_model_file))
        assert proc.returncode == 0, proc.stderr
        want = dict(read_csv(csv_out)[1:])
        for path, answer in zip(files, answers):
            name = path.relative_to(messy_folder).as_posix()
            if name == "corrupt.jpg":
                assert answer["label"] is None and answer["error"], answer
            else:
                assert answer["label"] == want[name] and answer["error"] == "", (name, answer)

        # A request that is not what the model takes is that request's error; the server answers the next one.
        status, body = post({"dataframe_records": [{"image": ""}]})
        assert status == 200 and "needs 'image'" in body["predictions"][0]["error"], body
        status, body = post({"dataframe_records": [{"pixels": [[1, 2], [3, 4]]}]})  # not H×W×3: the schema says no
        assert status == 400 and "error_code" in body, body
        assert post({"dataframe_records": records[:1]})[0] == 200


def test_a_version_logged_in_keras_own_flavour_still_loads(mlflow_store, tiny_model) -> None:
    """Registries made before versions served images hold Keras-flavoured versions: they load, with no threshold."""
    import mlflow.keras

    with mlflow.start_run():
        info = mlflow.keras.log_model(tiny_model.model, name="model", registered_model_name="cifake-legacy")
    loaded, threshold = serving.load_with_threshold(f"models:/cifake-legacy/{info.registered_model_version}")
    want = inference.predict_proba(tiny_model.model, tiny_model.x)
    assert threshold is None and np.array_equal(inference.predict_proba(loaded, tiny_model.x), want)


def test_records_without_an_image_get_an_error_never_silence(served: str) -> None:
    """A record with neither field beside one that has a field gets its own error. Records that all lack both
    reach the model as an empty frame (MLflow's schema check drops the unknown field, and the rows with it): that
    request is refused whole, never answered with no rows."""
    loaded = mlflow.pyfunc.load_model(served)
    wrong = {"picture": encoded(noise(32, 32, 156, 256, 1), "PNG")}
    beside = loaded.predict(pd.DataFrame([{"image": wrong["picture"]}, wrong]))
    assert beside["label"].tolist() == ["Fake", None] and "needs 'image'" in beside["error"][1]
    for alone in (pd.DataFrame([wrong, wrong]), pd.DataFrame([{}, {}]), pd.DataFrame([])):
        with pytest.raises(MlflowException, match="no record carries 'image'") as refused:
            loaded.predict(alone)
        assert refused.value.get_http_status_code() == 400
    # in process, a frame that names a field keeps it: no rows in, no rows out
    assert len(loaded.predict(pd.DataFrame({"image": pd.Series([], dtype=object)}))) == 0


def test_a_request_over_the_record_or_byte_limit_is_refused_whole(served: str, monkeypatch) -> None:
    record = {"image": encoded(noise(32, 32, 156, 256, 1), "PNG")}
    assert serving.MAX_RECORDS >= 64 and serving.MAX_REQUEST_BYTES >= 64 * len(record["image"])  # a batch of 64
    monkeypatch.setenv("CIFAKE_SERVING_MAX_RECORDS", "3")
    monkeypatch.setenv("CIFAKE_SERVING_MAX_BYTES", str(3 * len(record["image"]) + 10))
    loaded = mlflow.pyfunc.load_model(served)
    assert loaded.predict(pd.DataFrame([record] * 3))["label"].tolist() == ["Fake"] * 3
    with pytest.raises(MlflowException, match="at most 3 records") as refused:
        loaded.predict(pd.DataFrame([record] * 4))
    assert refused.value.get_http_status_code() == 400
    big = {"image": record["image"] + "A" * (len(record["image"]) + 20)}  # over the bytes with 2 records
    with pytest.raises(MlflowException, match=r"at most \d+ bytes of images"):
        loaded.predict(pd.DataFrame([record, big]))
    pixels = np.zeros((100, 100, 3), np.uint8).tolist()  # 30,000 values, over 3 small PNGs' worth
    with pytest.raises(MlflowException, match="bytes of images"):
        loaded.predict(pd.DataFrame([{"pixels": pixels}]))
    monkeypatch.setenv("CIFAKE_SERVING_MAX_RECORDS", "0")
    with pytest.raises(ValueError, match="CIFAKE_SERVING_MAX_RECORDS must be a positive integer"):
        mlflow.pyfunc.load_model(served)


@pytest.mark.slow  # the server imports TensorFlow and loads the model: ~20-40 s
def test_the_server_under_load_and_hostile_requests_answers_every_record(served: str, mlflow_store,
                                                                         tmp_path: Path) -> None:
    """bench/load.py in short: 4 clients with single PNGs, JPEGs and batches of 64 with broken records (each broken
    record its own error, every record an answer), then each hostile request (a body over the size cap, too many
    records, pixel bombs, malformed JSON, a wrong field name, an empty request) answered with a 4xx or the record's
    own error, and the server answering the next request each time."""
    from bench import load

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store.uri, "PYTHONPATH": str(ROOT)}
    with load.serve(served, env, tmp_path / "serve.log") as server:
        pool = load.payloads()
        tally, _ = load.drive(server.url, clients=4, requests=6, deadline_s=120, pool=pool)
        assert tally.errors == [] and sum(map(len, tally.latencies.values())) == 24, tally.errors[:3]
        assert tally.images == 8 * (2 + 62)  # the broken records are not counted as answered images
        rss_before = server.rss_mib()
        results = load.hostile(server, big_mib=20)
        assert {r["request"] for r in results} >= {"body_over_size", "wrong_field_name", "malformed_json",
                                                   "pixel_bomb_over_max_pixels", "empty_record_list"}
        for r in results:
            assert r["ok"] and r["still_serving"], r
        # a refused 20 MiB body is not kept: the process grows by less than a few copies of it
        assert server.rss_mib() - rss_before < 500, (rss_before, results)


@pytest.mark.slow  # the server imports TensorFlow and loads the model: ~20-40 s
def test_mlflow_models_serve_labels_at_the_versions_stored_threshold(mlflow_store, small_model_file,
                                                                     tmp_path: Path) -> None:
    # The served version keeps a threshold at which a small model's labels differ from 0.5's: a server that
    # answered at 0.5 (or at the signature's default param, 0) unless asked gives other labels. A request's own
    # threshold still decides.
    from tests.conftest import cue_images, threshold_that_matters

    images = cue_images(12, seed=3)[0]
    p = inference.predict_proba(store.load(small_model_file), images)
    stored = threshold_that_matters(p)
    with mlflow.start_run():
        info = serving.log_version(small_model_file, {**SETTINGS, "threshold": stored}, "model", NAME)
    from bench import load

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store.uri, "PYTHONPATH": str(ROOT)}
    with load.serve(f"models:/{NAME}/{info['version']}", env, tmp_path / "serve.log") as server:
        def labels(**extra) -> list[str]:
            body = {"dataframe_records": [{"pixels": img.tolist()} for img in images], **extra}
            status, answer, _ = load.post(server.url, json.dumps(body).encode())
            assert status == 200, answer
            return [a["label"] for a in answer["predictions"]]

        assert labels() == predicting.labels(p, stored) != predicting.labels(p, 0.5)
        assert labels(params={"threshold": 0.5}) == predicting.labels(p, 0.5)
