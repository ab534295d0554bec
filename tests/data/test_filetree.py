"""pipeline.data.filetree: folders and zips read alike, written atomically and byte-stably, unsafe zips refused."""
from __future__ import annotations

import time
import zipfile
from pathlib import Path

import pytest

from pipeline.data import filetree
from pipeline.errors import DataError

FILES = {"b.JPG": b"1", "a.png": b"2", "sub/g.jpg": b"3", ".hidden": b"4", "notes.txt": b"5"}


def write(target: Path) -> Path:
    with filetree.writer(target) as put:
        for name, data in FILES.items():
            put(name, data)
    return target


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_folder_and_zip_list_and_read_the_same(tmp_path: Path, kind: str) -> None:
    tree = filetree.Tree(write(tmp_path / ("t.zip" if kind == "zip" else "t")))
    assert tree.names() == sorted(FILES)  # sorted, recursive, hidden files and non-images included
    assert {n: tree.read(n) for n in tree.names()} == FILES
    with pytest.raises(DataError, match="cannot read nope"):
        tree.read("nope")


def test_zip_bytes_depend_only_on_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = write(tmp_path / "a.zip").read_bytes()
    monkeypatch.setattr(time, "time", lambda: 2e9)  # written in 2033: a timestamp leaking into the zip would show
    b = write(tmp_path / "b.zip").read_bytes()
    assert a == b


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_an_interrupted_write_keeps_the_previous_tree(tmp_path: Path, kind: str) -> None:
    target = write(tmp_path / ("t.zip" if kind == "zip" else "t"))
    with pytest.raises(RuntimeError), filetree.writer(target) as put:
        put("new.jpg", b"x")
        raise RuntimeError("interrupted")
    assert filetree.Tree(target).names() == sorted(FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temporary left behind


@pytest.mark.parametrize("entry", ["../evil.jpg", "/etc/evil.jpg", "C:/evil.jpg"])
def test_a_zip_with_an_unsafe_entry_is_refused_whole(tmp_path: Path, entry: str) -> None:
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("train/REAL/ok.jpg", b"x")
        zf.writestr(zipfile.ZipInfo(entry), b"x")
    with pytest.raises(DataError, match="unsafe zip entry"):
        filetree.Tree(archive)


def test_cached_tree_notices_a_replaced_zip(tmp_path: Path) -> None:
    target = write(tmp_path / "t.zip")
    assert "a.png" in filetree.cached(target).names()
    with filetree.writer(target) as put:
        put("only.jpg", b"x")
    assert filetree.cached(target).names() == ["only.jpg"]
