"""Where the raw CIFAKE tree comes from: the built-in sample, a local folder or .zip, or Kaggle.

Whatever the source, the output is ``{train,test}/{REAL,FAKE}/*`` written atomically: an interrupted or failed
fetch leaves the previous output as it was.
"""
from __future__ import annotations

import shutil
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from pipeline import config, io, sample
from pipeline.errors import DataError

CLASS_DIRS = tuple(f"{split}/{cls}" for split in sample.SPLITS for cls in sample.CLASSES)
LAYOUT = ("expected CIFAKE layout: train/REAL, train/FAKE, test/REAL and test/FAKE, each holding images, at the "
          "top level or inside one folder (as in the Kaggle zip)")


def fetch(params: config.Params, out_dir: Path) -> dict[str, int]:
    """Fill ``out_dir`` from ``params.data.source``; return the file count per ``split/CLASS`` folder."""
    data = params.data
    with io.atomic_dir(out_dir) as tmp:
        if data.source == "sample":
            return sample.write_sample(tmp, params.sample, params.base.seed)
        path = data.path if data.source == "local" else download(data.kaggle_handle)
        return copy_local(Path(path), tmp)


def download(handle: str) -> Path:
    """Download (or reuse kagglehub's cache of) a Kaggle dataset; any failure becomes a DataError saying what to do."""
    import kagglehub

    try:
        return Path(kagglehub.dataset_download(handle))
    except Exception as err:  # network, credentials, unknown handle: the user's remedy is the same
        raise DataError(
            f"could not download Kaggle dataset {handle!r} ({type(err).__name__}: {str(err)[:300]}). "
            "Kaggle needs network access and credentials: set KAGGLE_USERNAME and KAGGLE_KEY, put kaggle.json in "
            "~/.kaggle/, or run `kagglehub login`. Or download the zip by hand from "
            f"https://www.kaggle.com/datasets/{handle.split('/versions/')[0]} and set data.source: local and "
            "data.path: <the .zip or its unpacked folder>"
        ) from err


def copy_local(path: Path, out: Path) -> dict[str, int]:
    """Copy a CIFAKE folder or extract a CIFAKE .zip into ``out``; return counts per class folder."""
    if not path.exists():
        raise DataError(f"{path}: not found (data.path must be a CIFAKE folder or .zip)")
    if path.is_dir():
        root = _find_root({p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}, str(path))
        for rel in CLASS_DIRS:
            shutil.copytree(path / root / rel, out / rel)
    elif path.suffix.lower() == ".zip" or zipfile.is_zipfile(path):
        _extract(path, out)
    else:
        raise DataError(f"{path}: neither a folder nor a .zip archive; {LAYOUT}")
    return {rel: sum(1 for p in (out / rel).rglob("*") if p.is_file()) for rel in CLASS_DIRS}


def _find_root(files: set[str], label: str) -> str:
    """The prefix ('' or one folder name) under which all four class folders hold files, else a DataError."""
    tops = sorted({f.split("/", 1)[0] for f in files if "/" in f})
    candidates = [""] + [t for t in tops if t not in ("train", "test")]
    present = {c: {rel for rel in CLASS_DIRS if any(f.startswith(f"{c}/{rel}/".lstrip("/")) for f in files)}
               for c in candidates}
    for c in candidates:
        if len(present[c]) == len(CLASS_DIRS):
            return c
    best = max(candidates, key=lambda c: len(present[c]))  # report against the closest match
    missing = [rel for rel in CLASS_DIRS if rel not in present[best]]
    where_txt = f"{label}/{best}" if best else label
    raise DataError(f"{where_txt}: missing or empty: {', '.join(missing)}; {LAYOUT}")


def _unsafe(info: zipfile.ZipInfo) -> str | None:
    """Why extracting this entry could write outside the target, or None if it is safe."""
    name = info.filename
    if stat.S_ISLNK(info.external_attr >> 16):
        return "is a symbolic link"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "has an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "has a '..' component"
    return None


def _extract(archive: Path, out: Path) -> None:
    """Extract the class folders of a CIFAKE zip, refusing the whole archive if any entry is unsafe."""
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:  # check everything before writing anything
                if reason := _unsafe(info):
                    raise DataError(f"{archive}: refusing unsafe zip entry {info.filename!r}: it {reason}")
            files = {PurePosixPath(i.filename).as_posix().removeprefix("./"): i for i in infos if not i.is_dir()}
            root = _find_root(set(files), str(archive))
            prefix = f"{root}/" if root else ""
            target = out.resolve()
            for name, info in files.items():
                rel = name.removeprefix(prefix)
                if not name.startswith(prefix) or not rel.startswith(tuple(f"{d}/" for d in CLASS_DIRS)):
                    continue  # anything beside the class folders (a README, __MACOSX/) is not data
                dest = (out / rel).resolve()
                if not dest.is_relative_to(target):  # belt and braces after _unsafe
                    raise DataError(f"{archive}: refusing zip entry {info.filename!r}: it resolves outside {out}")
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError) as err:
        raise DataError(f"{archive}: cannot extract the zip archive: {err}") from err
