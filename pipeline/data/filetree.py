"""A set of files under relative POSIX names, kept in a folder or in one ``.zip``: read and written the same way.

The pipeline keeps its image datasets (the raw CIFAKE tree, Test_dataset_2) as one zip each, the way Kaggle ships
CIFAKE: DVC then tracks one file instead of tens of thousands, which is what makes a no-op ``dvc repro`` fast at
CIFAKE size. Users can point every reader at a folder or a zip alike. Zips are written stored (images do not
compress), in the order they are put, with fixed timestamps, so the same files give the same bytes.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import stat
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from pipeline.errors import DataError
from pipeline.io import atomic_dir, atomic_path

log = logging.getLogger(__name__)

_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can say: no build time leaks into the bytes
# A zip bomb declares huge entries in a tiny archive. No image this pipeline reads comes near these sizes (Pillow
# refuses more than 89 M pixels anyway), and zlib cannot beat ~1,030:1, which only near-constant data reaches.
MAX_ENTRY_BYTES = 256 * 2**20
MAX_RATIO = 200  # for entries above 1 MiB: photographs and encoded images compress far less


def is_zip(path: str | Path) -> bool:
    return str(path).lower().endswith(".zip")


def unsafe_entry(info: zipfile.ZipInfo) -> str | None:
    """Why this zip entry could escape the folder it would be extracted to, or None if it cannot."""
    name = info.filename
    if stat.S_ISLNK(info.external_attr >> 16):
        return "is a symbolic link"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "has an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "has a '..' component"
    if info.file_size > MAX_ENTRY_BYTES:
        return f"declares {info.file_size / 2**20:,.0f} MiB uncompressed (at most {MAX_ENTRY_BYTES // 2**20} MiB)"
    if info.file_size > 2**20 and info.file_size > MAX_RATIO * max(info.compress_size, 1):
        return (f"expands {info.compress_size:,} bytes to {info.file_size:,} (more than {MAX_RATIO}:1, a zip bomb's "
                "signature)")
    return None


def declared_size(path: str | Path) -> int:
    """The bytes a zip's entries declare uncompressed (0 for a folder): what extracting it would write."""
    if Path(path).is_dir():
        return 0
    with zipfile.ZipFile(path) as zf:
        return sum(i.file_size for i in zf.infolist())


class Unreadable(DataError):
    """One file of a tree cannot be read (a damaged zip entry, a file without read permission): a caller reading
    many images loses that one (``why`` is the reason), not the run."""

    def __init__(self, path: Path, name: str, err: BaseException):
        self.why = f"{type(err).__name__}: {err}"
        super().__init__(f"{path}: cannot read {name}: {err}")


class Tree:
    """Read access to the files of a folder or a zip: sorted relative names, and bytes by name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"{self.path}: not found")
        self._zip: zipfile.ZipFile | None = None
        self._names: list[str] | None = None  # a folder is listed when asked: readers by name never need it
        if not self.path.is_dir():
            try:
                self._zip = zipfile.ZipFile(self.path)
                infos = self._zip.infolist()
            except (zipfile.BadZipFile, OSError) as err:
                raise DataError(f"{self.path}: not a folder, and not a readable zip archive ({err}); if it is a "
                                "download, it may be truncated: fetch it again") from None
            for info in infos:  # refuse the whole archive if any entry could escape an extraction
                if reason := unsafe_entry(info):
                    raise DataError(f"{self.path}: refusing unsafe zip entry {info.filename!r}: it {reason}")
            self._names = sorted(PurePosixPath(i.filename).as_posix().removeprefix("./") for i in infos
                                 if not i.is_dir())

    def names(self) -> list[str]:
        if self._names is None:
            self._names = _walk(self.path)
        return self._names

    def read(self, name: str) -> bytes:
        try:
            if self._zip is None:
                return (self.path / name).read_bytes()
            return self._zip.read(name)
        except (OSError, KeyError, zipfile.BadZipFile, zlib.error, EOFError) as err:
            raise Unreadable(self.path, name, err) from None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cached(path: str | Path) -> Tree:
    """One open :class:`Tree` per file and process (decode workers read many members of one zip); a file replaced
    since (another inode, size or time) gets a new one."""
    try:
        st = os.stat(path)
    except OSError:
        return Tree(path)  # raises the clear "not found"
    return _cached(str(path), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _cached(path: str, *_stat: int) -> Tree:
    return Tree(path)


def _walk(folder: Path) -> list[str]:
    """Every file under ``folder`` (hidden ones too) as a relative POSIX path, sorted, so the order is the same
    on every machine and filesystem. Strings, not Paths: pathlib's parsing is slow at 100k files. Symbolic links
    that lead outside ``folder`` are not followed (a shared folder must not make the pipeline read or copy files
    it was not given); links that stay inside are, as are DVC's links into a cache inside the folder."""
    found: list[str] = []
    inside = os.path.realpath(folder)
    outside: list[str] = []
    for root, dirs, files in os.walk(folder):  # os.walk does not descend into linked folders
        rel = os.path.relpath(root, folder).replace(os.sep, "/")
        prefix = "" if rel == "." else f"{rel}/"
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path) and os.path.commonpath([inside, os.path.realpath(path)]) != inside:
                outside.append(prefix + name)
            else:
                found.append(prefix + name)
        outside.extend(prefix + d for d in dirs if os.path.islink(os.path.join(root, d)))
    if outside:
        log.warning("%s: not following %d symbolic link(s) that lead outside it (e.g. %s); copy the files in to "
                    "use them", folder, len(outside), sorted(outside)[0])
    return sorted(found)


@contextlib.contextmanager
def writer(target: str | Path) -> Iterator[Callable[[str, bytes], None]]:
    """Yield ``put(name, data)`` writing into a new folder, or a new zip when ``target`` ends in ``.zip``; the
    result replaces ``target`` only when the block completes, so an interrupted write leaves the old one."""
    target = Path(target)
    if is_zip(target):
        with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            def put(name: str, data: bytes) -> None:
                info = zipfile.ZipInfo(name, date_time=_EPOCH)
                info.external_attr = 0o644 << 16
                zf.writestr(info, data)

            yield put
    else:
        with atomic_dir(target) as tmp:
            def put(name: str, data: bytes) -> None:
                path = tmp / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)

            yield put
