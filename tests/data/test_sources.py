"""Fetching the raw tree: local folders and zips (safely), Kaggle (offline), the sample, and atomic output."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import requests
from PIL import Image

from pipeline import config
from pipeline.data import filetree, sample, sources
from pipeline.errors import DataError

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("train/REAL", "train/FAKE", "test/REAL", "test/FAKE")


def make_tree(root: Path, per_folder: int = 2, skip: str | None = None) -> Path:
    """A tiny CIFAKE tree of solid-colour 32x32 JPEGs; ``skip`` leaves one class folder empty."""
    for i, folder in enumerate(FOLDERS):
        (root / folder).mkdir(parents=True)
        if folder == skip:
            continue
        for n in range(per_folder):
            Image.new("RGB", (32, 32), (40 * i, 10 * n, 99)).save(root / folder / sample.cifake_name(n))
    return root


def zip_tree(tree: Path, archive: Path, prefix: str = "", extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(tree.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(tree).as_posix())
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return archive


def params_for(tmp_path: Path, *overrides: str) -> config.Params:
    return config.load(REPO / "params.yaml", [f"paths.raw={tmp_path / 'raw'}", *overrides])


def leftovers(parent: Path) -> list[str]:
    """Temporary folders atomic_dir may leave beside the output if it is not cleaned up."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".raw."))


def test_local_folder_is_copied(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "cifake", per_folder=3)
    params = params_for(tmp_path, "data.source=local", f"data.path={tree}")
    counts = sources.fetch(params, params.paths.raw)
    assert counts == dict.fromkeys(FOLDERS, 3)
    for folder in FOLDERS:
        copied, original = params.paths.raw / folder / "0000 (3).jpg", tree / folder / "0000 (3).jpg"
        assert copied.read_bytes() == original.read_bytes()


@pytest.mark.parametrize("prefix", ["", "cifake/"], ids=["flat", "nested-one-level"])
def test_local_zip_is_extracted(tmp_path: Path, prefix: str) -> None:
    tree = make_tree(tmp_path / "tree")
    junk = {f"{prefix}README.txt": b"not data", "__MACOSX/._x": b"resource fork"}
    archive = zip_tree(tree, tmp_path / "cifake.zip", prefix, junk)
    params = params_for(tmp_path, "data.source=local", f"data.path={archive}")
    assert sources.fetch(params, params.paths.raw) == dict.fromkeys(FOLDERS, 2)
    assert sorted(p.name for p in params.paths.raw.iterdir()) == ["test", "train"]  # the junk is not data
    with Image.open(params.paths.raw / "test/FAKE/0000.jpg") as im:
        assert im.size == (32, 32)


def unsafe_zip(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A valid CIFAKE zip with one malicious entry; returns it and that entry's name."""
    tree = make_tree(tmp_path / "tree")
    archive = zip_tree(tree, tmp_path / f"{kind}.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        if kind == "dotdot":
            name = "train/REAL/../../../evil.jpg"
            zf.writestr(name, b"evil")
        elif kind == "absolute":
            name = str(tmp_path / "absolute-evil.jpg")
            zf.writestr(zipfile.ZipInfo(name), b"evil")
        else:
            name = "train/REAL/link.jpg"
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, str(tmp_path / "symlink-target"))
    with zipfile.ZipFile(archive) as zf:
        assert name in zf.namelist()  # the archive really carries the entry as written
    return archive, name


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_unsafe_zip_is_refused_and_nothing_is_written(tmp_path: Path, kind: str) -> None:
    archive, entry = unsafe_zip(tmp_path, kind)
    before = {p for p in tmp_path.rglob("*")}
    params = params_for(tmp_path, "data.source=local", f"data.path={archive}")
    with pytest.raises(DataError, match="unsafe zip entry") as err:
        sources.fetch(params, params.paths.raw)
    assert repr(entry) in str(err.value)
    assert {p for p in tmp_path.rglob("*")} == before  # no output, no evil file, no temporary folder
    assert not any("evil" in p.name or p.is_symlink() for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_layout_errors_say_what_is_missing(tmp_path: Path, as_zip: bool) -> None:
    tree = make_tree(tmp_path / "tree", skip="test/FAKE")
    path = zip_tree(tree, tmp_path / "cifake.zip") if as_zip else tree
    params = params_for(tmp_path, "data.source=local", f"data.path={path}")
    with pytest.raises(DataError, match=r"missing or empty: test/FAKE; expected CIFAKE layout"):
        sources.fetch(params, params.paths.raw)
    assert not (tmp_path / "raw").exists() and leftovers(tmp_path) == []


def test_unusable_paths_are_clear(tmp_path: Path) -> None:
    def fetch(path):
        return sources.fetch(params_for(tmp_path, "data.source=local", f"data.path={path}"), tmp_path / "raw")

    with pytest.raises(DataError, match="not found"):
        fetch(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="neither a folder nor a .zip"):
        fetch(tmp_path / "notes.txt")
    archive = zip_tree(make_tree(tmp_path / "tree"), tmp_path / "cut.zip")
    archive.write_bytes(archive.read_bytes()[:300])  # a truncated download
    with pytest.raises(DataError, match="not a readable zip archive"):
        fetch(archive)


def test_kaggle_offline_fails_fast_with_instructions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kagglehub

    def offline(handle: str) -> str:  # what kagglehub 1.0.3 raised, seen on a machine with no network
        raise requests.exceptions.ConnectionError(
            "HTTPSConnectionPool(host='api.kaggle.com', port=443): Max retries exceeded "
            "(Caused by NameResolutionError: Failed to resolve 'api.kaggle.com')")

    monkeypatch.setattr(kagglehub, "dataset_download", offline)
    params = params_for(tmp_path, "data.source=kaggle")
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        sources.fetch(params, params.paths.raw)
    assert time.perf_counter() - start < 5
    message = str(err.value)
    for hint in ("ConnectionError", "KAGGLE_USERNAME", "KAGGLE_KEY", "kaggle.json", "kagglehub login",
                 "data.source: local", "data.path"):
        assert hint in message, hint
    assert not (tmp_path / "raw").exists() and leftovers(tmp_path) == []


def test_kaggle_download_is_used_like_a_local_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kagglehub

    version_dir = tmp_path / "kaggle" / "versions" / "3"
    make_tree(version_dir / "cifake")  # nested one level, as some archives are
    calls = []
    monkeypatch.setattr(kagglehub, "dataset_download", lambda handle: calls.append(handle) or str(version_dir))
    params = params_for(tmp_path, "data.source=kaggle", "data.kaggle_handle=someone/cifake")
    assert sources.fetch(params, params.paths.raw) == dict.fromkeys(FOLDERS, 2)
    assert calls == ["someone/cifake"]


def test_kaggle_pinned_version_from_a_filled_cache_needs_no_network(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kagglehub import cache, handle

    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    pinned = handle.parse_dataset_handle("someone/cifake/versions/3")
    make_tree(Path(cache.Cache().get_path(pinned)))
    cache.Cache().mark_as_complete(pinned)
    params = params_for(tmp_path, "data.source=kaggle", "data.kaggle_handle=someone/cifake/versions/3")
    assert sources.fetch(params, params.paths.raw) == dict.fromkeys(FOLDERS, 2)


def test_sample_source(tmp_path: Path) -> None:
    params = params_for(tmp_path, "data.source=sample", "sample.train_per_class=3", "sample.test_per_class=2")
    counts = sources.fetch(params, params.paths.raw)
    assert counts == {"train/REAL": 3, "train/FAKE": 3, "test/REAL": 2, "test/FAKE": 2}
    assert len(list(params.paths.raw.rglob("*.jpg"))) == 10


@pytest.mark.parametrize("source", ["sample", "zip"])
def test_failure_midway_keeps_previous_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    previous = make_tree(tmp_path / "raw", per_folder=1)
    (previous / "marker.txt").write_text("previous run")
    overrides = ["data.source=sample", "sample.train_per_class=5", "sample.test_per_class=5"]
    if source == "zip":
        overrides += ["data.source=local", f"data.path={zip_tree(make_tree(tmp_path / 'tree'), tmp_path / 'c.zip')}"]
    writes = []

    def failing(*args, **kwargs):  # the fifth file write fails, as on a full disk
        writes.append(1)
        if len(writes) == 5:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    if source == "sample":
        real = sample._jpeg
        monkeypatch.setattr(sample, "_jpeg", failing)
    else:
        real = filetree.Tree.read
        monkeypatch.setattr(filetree.Tree, "read", failing)
    params = params_for(tmp_path, *overrides)
    with pytest.raises((OSError, DataError), match="No space left"):
        sources.fetch(params, params.paths.raw)
    assert len(writes) == 5
    assert (previous / "marker.txt").read_text() == "previous run"
    assert sorted(p.relative_to(previous).as_posix() for p in previous.rglob("*.jpg")) == \
        sorted(f"{f}/0000.jpg" for f in FOLDERS)
    assert leftovers(tmp_path) == []


def run_stage(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "src/fetch.py", "-S", f"paths.raw={tmp_path / 'raw'}"]
    for o in overrides:
        args += ["-S", o]
    env = {**os.environ, "PYTHONPATH": ""}  # the script must find `pipeline` on its own
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)


def test_stage_script_writes_the_tree_and_fails_cleanly(tmp_path: Path) -> None:
    done = run_stage(tmp_path, "data.source=sample", "sample.train_per_class=2", "sample.test_per_class=1")
    assert done.returncode == 0, done.stderr
    assert "train/FAKE" in done.stderr and len(list((tmp_path / "raw").rglob("*.jpg"))) == 6
    failed = run_stage(tmp_path, "data.source=local", f"data.path={tmp_path / 'nowhere.zip'}")
    assert failed.returncode == 1
    assert "error:" in failed.stderr and "not found" in failed.stderr and "Traceback" not in failed.stderr
    assert len(list((tmp_path / "raw").rglob("*.jpg"))) == 6  # the earlier output survives the failure


def test_fetch_to_a_zip_is_byte_stable_and_preprocesses_like_the_folder(tmp_path: Path) -> None:
    from pipeline.data import preprocess

    small = ["sample.train_per_class=6", "sample.test_per_class=3"]
    params = params_for(tmp_path, *small)
    first, again, folder = tmp_path / "a.zip", tmp_path / "b.zip", tmp_path / "tree"
    counts = sources.fetch(params, first)
    assert counts == {"train/REAL": 6, "train/FAKE": 6, "test/REAL": 3, "test/FAKE": 3}
    sources.fetch(params, again)
    sources.fetch(params, folder)
    assert first.read_bytes() == again.read_bytes()  # one file for DVC, the same bytes every time
    with zipfile.ZipFile(first) as zf:
        assert {i.filename for i in zf.infolist()} == {p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg")}
        assert all(zf.read(p.relative_to(folder).as_posix()) == p.read_bytes() for p in folder.rglob("*.jpg"))
    cfg = params.preprocess
    for name, raw in (("zip", first), ("folder", folder)):
        preprocess.preprocess(raw, tmp_path / f"out-{name}", cfg, seed=0, progress=False)
    for split in ("train", "val", "test"):
        for f in ("x.npy", "y.npy", "names.json"):
            assert (tmp_path / "out-zip" / split / f).read_bytes() == (tmp_path / "out-folder" / split / f).read_bytes()


def test_a_local_zip_can_be_repacked_into_the_raw_zip(tmp_path: Path) -> None:
    archive = zip_tree(make_tree(tmp_path / "tree"), tmp_path / "c.zip", prefix="cifake/", extra={"README.md": b"x"})
    params = params_for(tmp_path, "data.source=local", f"data.path={archive}")
    counts = sources.fetch(params, tmp_path / "raw.zip")
    assert counts == dict.fromkeys(FOLDERS, 2)
    with zipfile.ZipFile(tmp_path / "raw.zip") as zf:  # the class folders at the top, nothing else
        assert sorted({n.rsplit("/", 1)[0] for n in zf.namelist()}) == sorted(FOLDERS)
