"""Hostile inputs to the real stage scripts: each gives one clear ``error:`` line (or a warning, for links that are
skipped), a non-zero exit, and leaves nothing partial behind."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.data import filetree, sources
from pipeline.errors import DataError
from tests.data.test_sources import make_tree, params_for

ROOT = Path(__file__).resolve().parents[2]


def run_stage(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"src/{script}.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def tmp_paths(tmp_path: Path) -> list[str]:
    """Overrides that keep every output of a stage inside tmp_path."""
    return ["-S", f"paths.raw={tmp_path}/out/raw.zip", "-S", f"paths.processed={tmp_path}/out/processed",
            "-S", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlruns/mlflow.db"]


def zip_bomb(tmp_path: Path, megabytes: int) -> Path:
    """A valid CIFAKE tree plus one 'image' of ``megabytes`` MiB of zeros, deflated to a few hundred KiB."""
    archive = tmp_path / "bomb.zip"
    tree = make_tree(tmp_path / "tree")
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(tree.rglob("*.jpg")):
            zf.write(path, path.relative_to(tree).as_posix())
        with zf.open("train/FAKE/bomb.jpg", "w") as entry:
            zero = bytes(2**20)
            for _ in range(megabytes):
                entry.write(zero)
    return archive


@pytest.mark.parametrize("megabytes", [300, 8], ids=["over-the-size-cap", "over-the-ratio-cap"])
def test_a_zip_bomb_is_refused_before_anything_is_written(tmp_path: Path, megabytes: int) -> None:
    archive = zip_bomb(tmp_path, megabytes)
    assert archive.stat().st_size < megabytes * 2**20 / 100  # it really is a bomb: tiny archive, huge entry
    proc = run_stage("fetch", "-S", "data.source=local", "-S", f"data.path={archive}", *tmp_paths(tmp_path))
    assert proc.returncode == 1, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "train/FAKE/bomb.jpg" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_extraction_larger_than_the_free_disk_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = make_tree(tmp_path / "tree")
    archive = tmp_path / "tree.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(tree.rglob("*.jpg")):
            zf.write(path, path.relative_to(tree).as_posix())
    need = filetree.declared_size(archive)
    monkeypatch.setattr(sources.shutil, "disk_usage", lambda _: SimpleNamespace(free=need - 1))
    params = params_for(tmp_path, "data.source=local", f"data.path={archive}")
    with pytest.raises(DataError, match="free"):
        sources.fetch(params, params.paths.raw)
    assert not params.paths.raw.exists()


def test_symlinks_leading_out_of_a_local_folder_are_not_followed(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    secret = tmp_path / "outside"
    secret.mkdir()
    (secret / "secret.jpg").write_bytes((tree / "train/REAL").iterdir().__next__().read_bytes())
    (tree / "train/REAL/leak.jpg").symlink_to(secret / "secret.jpg")
    (tree / "train/FAKE/leakdir").symlink_to(secret, target_is_directory=True)
    inside = next((tree / "test/REAL").iterdir())
    (tree / "test/REAL/alias.jpg").symlink_to(inside)  # a link that stays inside is an ordinary file

    proc = run_stage("fetch", "-S", "data.source=local", "-S", f"data.path={tree}", *tmp_paths(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "not following 2 symbolic link(s)" in proc.stderr
    with zipfile.ZipFile(tmp_path / "out/raw.zip") as zf:
        names = set(zf.namelist())
    assert "test/REAL/alias.jpg" in names
    assert not any("leak" in n or "secret" in n for n in names), names


def test_a_models_uri_that_does_not_exist_is_a_one_line_error(tmp_path: Path) -> None:
    folder = make_tree(tmp_path / "images")
    out = tmp_path / "out.csv"
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    proc = run_stage("predict", "--input", str(folder), "--output", str(out), "--model",
                     "models:/no-such-model@champion", *tmp_paths(tmp_path), env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 1, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "models:/no-such-model@champion" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_params_with_yaml_tags_are_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text()
                      + f'\nexploit: !!python/object/apply:os.system ["touch {marker}"]\n')
    proc = run_stage("fetch", "--params", str(params), *tmp_paths(tmp_path))
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and str(params) in lines[0] and "not valid YAML" in lines[0], proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()
