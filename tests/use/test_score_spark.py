"""Scoring on Spark (``src/score_spark.py``, :mod:`pipeline.use.spark`): in local mode, on the messy folder predict's
tests use, every label and P(FAKE) equals ``src/predict.py``'s for the same registered version, a broken file gets
its reason, the request's threshold reaches the model, and the model loads once per Python worker. Skips, saying
why, where Java 17+ or pyspark is missing."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from pipeline import config
from pipeline.errors import ConfigError, DataError
from pipeline.judge import registry
from pipeline.model import serving
from pipeline.use import predicting
from pipeline.use import spark as spark_scoring
from tests.use.test_predict import messy_folder, noise, read_csv  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[2]
PREPROCESS = config.load(ROOT / "params.yaml").preprocess


def _spark_missing() -> str | None:
    try:
        spark_scoring.check_java()
    except ConfigError as err:
        return str(err)
    try:
        import pyspark  # noqa: F401
    except ImportError:
        return "pyspark is not installed (pip install -r requirements-dev.txt)"
    return None


SPARK_MISSING = _spark_missing()
needs_spark = pytest.mark.skipif(SPARK_MISSING is not None, reason=f"Spark cannot run here: {SPARK_MISSING}")


def run_tool(script: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, f"src/{script}", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return out, err


@pytest.fixture
def folder(messy_folder: Path) -> Path:  # noqa: F811
    """Predict's messy folder (odd sizes and modes, a corrupt JPEG, a text file), plus a hidden file, an empty one,
    and grey images on which the graded model's P(FAKE) spreads over (0, 1)."""
    from tests.conftest import cue_images

    Image.fromarray(noise(32, 32, 0, 100, 7)).save(messy_folder / ".hidden.png")
    (messy_folder / "empty.png").write_bytes(b"")
    (messy_folder / "graded").mkdir()
    for i, img in enumerate(cue_images(12, seed=3)[0]):
        Image.fromarray(img).save(messy_folder / "graded" / f"{i:02d}.png")
    return messy_folder


@needs_spark
@pytest.mark.slow  # predict and Spark (a JVM, TensorFlow in two Spark workers) in subprocesses: ~60-90 s
def test_spark_answers_like_predict_and_the_request_threshold_reaches_the_model(
        folder: Path, tmp_path: Path, params, mlflow_store, small_model_file) -> None:
    # A small model (graded P(FAKE), a few MB): what is tested is the plumbing of the threshold, not the model.
    from pipeline.model import store
    from pipeline.model.inference import probabilities
    from tests.conftest import threshold_that_matters

    found = predicting.read_folder(folder, PREPROCESS.resize, PREPROCESS.max_pixels)
    p = dict(zip(found.names, probabilities(store.load(small_model_file), found.x, config.Inference())))
    stored = threshold_that_matters(np.array(list(p.values())))  # labels otherwise than 0.5 on >= 2 images
    with mlflow.start_run():  # the version keeps `stored`; the requests below ask for 0.5
        info = serving.log_version(small_model_file, serving.settings(stored, PREPROCESS), "model",
                                   params.mlflow.model_name)
    MlflowClient().set_registered_model_alias(params.mlflow.model_name, registry.CHAMPION, info["version"])
    uri = f"models:/{params.mlflow.model_name}@{registry.CHAMPION}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store.uri}

    csv_out, predicted = tmp_path / "spark.csv", tmp_path / "predict.csv"
    predict = run_tool("predict.py", "--input", str(folder), "--output", str(predicted), "--model", uri,
                       "--threshold", "0.5", env=env)
    # the default model (params' mlflow.model_name @champion), asked for threshold 0.5
    out, err = finish(run_tool("score_spark.py", "--input", str(folder), "--output", str(csv_out),
                               "--threshold", "0.5", env=env))
    finish(predict)

    rows = read_csv(csv_out)
    assert rows[0] == ["Image Name", "Predicted Label", "p_fake", "error"]
    body = {name: (label, p_fake, error) for name, label, p_fake, error in rows[1:]}
    assert [r[0] for r in rows[1:]] == sorted(body)  # sorted by name, as predict orders them
    want = read_csv(predicted)[1:]  # predict leaves broken files out
    assert [[name, body[name][0]] for name, _ in want] == want  # same names (hidden ones too), same labels
    assert sorted(set(body) - {name for name, _ in want}) == ["corrupt.jpg", "empty.png"]
    for name, _ in want:
        assert body[name][2] == "" and float(body[name][1]) == pytest.approx(p[name], abs=1e-5), name
    assert body["corrupt.jpg"][:2] == ("", "") and body["corrupt.jpg"][2].startswith("image: ")
    assert body["empty.png"] == ("", "", "image: empty file")
    assert "2 with an error" in out and "error corrupt.jpg: image:" in err

    labels = [body[name][0] for name in found.names]
    assert labels == predicting.labels(np.array([p[n] for n in found.names]), 0.5)
    # the request's 0.5 is what decided: the version's own threshold labels these images otherwise
    assert labels != predicting.labels(np.array([p[n] for n in found.names]), stored)

    # Without --threshold the version's own decides (a second JVM: one run cannot ask both ways).
    own_out = tmp_path / "own.csv"
    finish(run_tool("score_spark.py", "--input", str(folder), "--output", str(own_out), env=env))
    own = {name: label for name, label, _, _ in read_csv(own_out)[1:]}
    assert [own[n] for n in found.names] == predicting.labels(np.array([p[n] for n in found.names]), stored)


COUNTING_MODEL = """
import os

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class Counting(PythonModel):
    \"\"\"Calls every image Real, and notes which process loaded it.\"\"\"

    def load_context(self, context):
        with open(os.environ["CIFAKE_TEST_LOADS"], "a") as f:
            f.write(f"{os.getpid()}\\n")

    def predict(self, context, model_input, params=None):
        n = len(model_input)
        return pd.DataFrame({"label": ["Real"] * n, "p_fake": [0.0] * n, "error": [""] * n})


mlflow.models.set_model(Counting())
"""


@needs_spark
@pytest.mark.slow  # Spark in a subprocess, without TensorFlow: ~30-50 s here
def test_the_model_loads_once_per_worker_and_parquet_holds_the_same_rows(tmp_path: Path, monkeypatch) -> None:
    """150 files make 5 of Spark's file partitions here: a model loaded per task would load twice in one worker."""
    loads = tmp_path / "loads.txt"
    monkeypatch.setenv("CIFAKE_TEST_LOADS", str(loads))
    script = tmp_path / "counting.py"
    script.write_text(COUNTING_MODEL)
    mlflow.pyfunc.save_model(tmp_path / "counting", python_model=str(script), signature=serving.signature())
    loads.unlink(missing_ok=True)
    folder, png = tmp_path / "many", tmp_path / "one.png"
    Image.fromarray(noise(8, 8, 0, 256, 1)).save(png)
    names = sorted(f"{i % 3}/{i:03d}.png" for i in range(150))
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(png.read_bytes())

    out = tmp_path / "out.parquet"
    finish(run_tool("score_spark.py", "--input", str(folder), "--output", str(out), "--model",
                    str(tmp_path / "counting")))
    pids = loads.read_text().split()
    assert 1 <= len(pids) <= 2 and len(set(pids)) == len(pids), pids  # local[2]: at most one load per worker

    import pandas as pd

    table = pd.read_parquet(out)
    assert table.columns.tolist() == ["Image Name", "Predicted Label", "p_fake", "error"]
    assert table["Image Name"].tolist() == names
    assert set(table["Predicted Label"]) == {"Real"} and set(table["error"]) == {""}


def test_a_zip_is_scored_under_the_names_its_entries_have(messy_folder: Path, tmp_path: Path) -> None:  # noqa: F811
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(messy_folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(messy_folder).as_posix())
    with spark_scoring.source(str(archive)) as src:
        extracted = Path(src.paths[0])
        assert src.listed == predicting.list_images(messy_folder).members
        assert src.base == f"file:{extracted}/" and (extracted / "nested/deeper/inner.png").is_file()
        assert not (extracted / "notes.txt").exists()  # only images are extracted
    assert not extracted.exists()  # removed when the job is done

    from tests.use.test_predict import damage

    damage(archive, (messy_folder / "gray.png").read_bytes())  # an entry failing its checksum: one row, not the job
    with spark_scoring.source(str(archive)) as src:
        assert not (Path(src.paths[0]) / "gray.png").exists() and (Path(src.paths[0]) / "rgba.png").is_file()
        name, _, _, reason = spark_scoring._dropped(src, "gray.png")
        assert name == "gray.png" and reason.startswith("unreadable: BadZipFile") and "CRC" in reason

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("ok.png", b"x")
        zf.writestr("../escape.png", b"x")
    with pytest.raises(DataError, match="unsafe zip entry"), spark_scoring.source(str(evil)):
        pass


def test_a_glob_names_images_below_its_folder_part(messy_folder: Path, monkeypatch) -> None:  # noqa: F811
    with spark_scoring.source(f"{messy_folder}/ne*") as src:
        assert src.listed == ["nested/deeper/inner.png"]
        assert src.base == f"file:{messy_folder}/" and src.paths == [str(messy_folder / "nested")]
    with pytest.raises(DataError, match="no images"), spark_scoring.source(f"{messy_folder}/*.txt"):
        pass
    monkeypatch.chdir(messy_folder)
    with spark_scoring.source("*.png") as src:  # no folder part: the current one
        assert src.listed == ["gray.png", "odd_50x40.png", "rgba.png"] and src.base == f"file:{messy_folder}/"


def test_without_java_the_tool_says_in_one_line_what_to_install(messy_folder: Path, tmp_path: Path) -> None:  # noqa: F811
    env = {**os.environ, "JAVA_HOME": str(tmp_path / "no-java")}
    proc = run_tool("score_spark.py", "--input", str(messy_folder), "--output", str(tmp_path / "out.csv"), env=env)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "openjdk-17-jre-headless" in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "out.csv").exists()
