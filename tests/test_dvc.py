"""dvc.yaml against the code: each stage's code dependencies are exactly the import closure of its script, and its
params are keys that exist. (What the stages really read, and what `dvc status` says after each edit, is checked
on a real run in tests/test_e2e.py.)"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import provenance

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
# Keys no stage depends on, by design: paths.* are the stage definitions themselves (templated into dvc.yaml),
# mlflow.*, tune.storage and tune.heartbeat say where runs and the study are kept and how a dead worker is noticed,
# not what they compute.
NOT_DEPENDENCIES = ("paths.", "mlflow.", "tune.storage", "tune.heartbeat")


def leaves(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        out += leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return out


def covers(declared: str, key: str) -> bool:
    return key == declared or key.startswith(declared + ".")


@pytest.mark.parametrize("stage", list(STAGES))
def test_code_deps_are_the_import_closure_of_the_stage_script(stage: str) -> None:
    script = ROOT / "src" / f"{stage}.py"
    expected = {f"src/{stage}.py", *(p.as_posix() for p in provenance.closure(script))}
    declared = {d for d in STAGES[stage]["deps"] if d.endswith(".py")}
    assert declared == expected, (f"missing: {sorted(expected - declared)}",
                                  f"not imported: {sorted(declared - expected)}")


def test_closure_follows_lazy_imports_inside_functions() -> None:
    # features.for_head imports pipeline.data and pipeline.training inside the function body
    found = {p.name for p in provenance.closure(ROOT / "pipeline" / "features.py")}
    assert {"data.py", "training.py", "model.py", "config.py"} <= found


@pytest.mark.parametrize("stage", list(STAGES))
def test_declared_params_exist_and_are_results_not_tracking(stage: str) -> None:
    keys = leaves(PARAMS)
    for declared in STAGES[stage].get("params", []):
        assert any(covers(declared, k) for k in keys), f"{stage}: {declared} is not in params.yaml"
        assert not declared.startswith(NOT_DEPENDENCIES), f"{stage}: {declared} is tracking or a path"
        assert declared not in PARAMS, f"{stage}: {declared} is a whole section; list the keys the stage reads"


def test_every_params_key_is_read_by_some_stage_or_is_deliberately_none() -> None:
    declared = [d for s in STAGES.values() for d in s.get("params", [])]
    for key in leaves(PARAMS):
        if key.startswith(NOT_DEPENDENCIES):
            continue
        assert any(covers(d, key) for d in declared), f"{key}: no stage depends on it (dead key, or a missing dep)"


def test_code_digest_changes_with_the_code(tmp_path, monkeypatch) -> None:
    root = tmp_path / "repo"
    (root / "pipeline").mkdir(parents=True)
    for name in ("__init__.py", "model.py", "config.py", "errors.py", "io.py", "tuning.py"):
        src = ROOT / "pipeline" / name
        text = src.read_text() if name != "tuning.py" else "from pipeline import model\n"
        (root / "pipeline" / name).write_text(text)
    monkeypatch.setattr(provenance, "ROOT", root)
    provenance._imports.cache_clear()
    before = provenance.code_digest("pipeline.tuning")
    with open(root / "pipeline" / "io.py", "a") as f:  # a module two imports away
        f.write("\n# changed\n")
    assert provenance.code_digest("pipeline.tuning") != before
    provenance._imports.cache_clear()


def test_a_stage_runs_the_code_of_its_own_checkout(tmp_path: Path):
    """Two checkouts that differ in one module, with the environment pointing at the other one (as an editable
    install of a second clone does): the stage script imports its own."""
    repo = Path(__file__).resolve().parents[1]
    own, other = tmp_path / "own", tmp_path / "other"
    for checkout in (own, other):
        for folder in ("pipeline", "src"):
            shutil.copytree(repo / folder, checkout / folder, ignore=shutil.ignore_patterns("__pycache__"))
    with open(own / "pipeline" / "sources.py", "a") as f:
        f.write("\nraise SystemExit('imported the own checkout')\n")
    env = {**os.environ, "PYTHONPATH": str(other)}
    out = subprocess.run([sys.executable, str(own / "src" / "fetch.py")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert "imported the own checkout" in out.stderr, out.stderr[-2000:]
