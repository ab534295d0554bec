"""A stage killed with SIGKILL while it writes its output leaves nothing the next stage or DVC would trust, its
MLflow run does not stay RUNNING once the stage runs again, and the rerun succeeds."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from pipeline import config
from pipeline.data import preprocess, sample
from pipeline.model import store
from tests.conftest import PARAMS_FILE, tmp_overrides

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_advtrain_killed_while_saving_leaves_no_model_and_reruns_cleanly(tmp_path: Path, tiny_model_file) -> None:
    overrides = tmp_overrides(tmp_path) + ["advtrain.epochs=1", "advtrain.batch_size=16",
                                           "advtrain.trainable_from=null"]
    params = config.load(PARAMS_FILE, overrides)
    raw = tmp_path / "raw.zip"
    sample.write_sample(raw, config.Sample(train_per_class=16, test_per_class=4, jpeg_quality=95), 0, progress=False)
    preprocess.preprocess(raw, params.paths.processed, params.preprocess, 0, progress=False)
    params.paths.model.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_model_file, params.paths.model)
    args = [sys.executable, "src/advtrain.py", *(a for o in overrides for a in ("-S", o))]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("MLFLOW_TRACKING_URI", None)
    target = params.paths.model_h5  # written after model_adv.keras and its threshold, before MLflow has the model

    stage = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while stage.poll() is None and time.monotonic() < deadline:  # wait until the model file is being written
        if any(p.name.startswith(f".{target.name}.") for p in target.parent.iterdir()):
            stage.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    stage.wait(timeout=30)
    assert stage.returncode == -signal.SIGKILL, f"the stage was not caught writing: {stage.stderr.read()[-2000:]}"
    assert not target.exists()  # the half-written file has a temporary name nothing reads
    assert not (params.paths.metrics / "advtrain.json").exists()

    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[params.mlflow.experiment], output_format="list")
    assert [r.info.status for r in runs] == ["RUNNING"]  # SIGKILL: nothing could close it
    # The model already written and the threshold beside it belong together: predict on it now judges it at its own.
    stored = json.loads(params.paths.model_adv_info.read_text())["threshold"]
    assert stored == pytest.approx(runs[0].data.metrics["threshold"]) and store.load(params.paths.model_adv)

    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert store.load(target) is not None and (params.paths.metrics / "advtrain.json").exists()
    runs = mlflow.search_runs(experiment_names=[params.mlflow.experiment], output_format="list")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]


def test_a_native_crash_in_a_stage_leaves_its_python_stack_in_the_log(tmp_path: Path) -> None:
    """Every stage script ends in ``cli.run``, which turns faulthandler on for the stage and, through the
    environment, for the Python processes it starts: a segfault in TensorFlow, OpenVINO or Pillow then leaves the
    Python stack of each thread on stderr (DVC's log), where it would otherwise leave only a signal number."""
    import resource

    for script in sorted((ROOT / "src").glob("*.py")):
        text = script.read_text()
        assert 'if __name__ == "__main__":' in text and "cli.run(main)" in text, f"{script.name} skips cli.run"
    stage = ("import faulthandler, subprocess, sys\n"
             "from pipeline import cli\n"
             "def deep_in_the_stage():\n"
             "    child = subprocess.run([sys.executable, '-c', 'import faulthandler; faulthandler._sigsegv()'],\n"
             "                           capture_output=True, text=True)\n"
             "    sys.stderr.write(child.stderr)\n"
             "    faulthandler._sigsegv()\n"
             "cli.run(deep_in_the_stage)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTHONFAULTHANDLER", None)
    out = subprocess.run([sys.executable, "-c", stage], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)))
    assert out.returncode == -signal.SIGSEGV, out.stderr[-2000:]
    assert out.stderr.count("Fatal Python error: Segmentation fault") == 2, out.stderr[-2000:]  # stage and child
    assert 'line 7 in deep_in_the_stage' in out.stderr, out.stderr[-2000:]
