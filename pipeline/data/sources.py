"""Where the raw CIFAKE tree comes from: the built-in sample, a local folder or .zip, or Kaggle.

Whatever the source, the output is ``{train,test}/{REAL,FAKE}/*`` in one zip (``paths.raw``; a folder if that path
does not end in .zip), written atomically: an interrupted or failed fetch leaves the previous output as it was.
"""
from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

from pipeline import config
from pipeline.classes import CLASSES
from pipeline.data import filetree, sample
from pipeline.errors import DataError

CLASS_DIRS = tuple(f"{split}/{cls}" for split in sample.SPLITS for cls in CLASSES)
LAYOUT = ("expected CIFAKE layout: train/REAL, train/FAKE, test/REAL and test/FAKE, each holding images, at the "
          "top level or inside one folder (as in the Kaggle zip)")


def fetch(params: config.Params, out: Path) -> dict[str, int]:
    """Write ``out`` from ``params.data.source``; return the file count per ``split/CLASS`` folder."""
    data = params.data
    if data.source == "sample":
        return sample.write_sample(out, params.sample, params.base.seed)
    path = data.path if data.source == "local" else download(data.kaggle_handle)
    return copy_local(Path(path), out)


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
    """Copy the class folders of a CIFAKE folder or .zip into ``out`` (a folder, or a zip when it ends in .zip);
    return counts per class folder. A zip with any unsafe entry is refused whole, before anything is written."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found (data.path must be a CIFAKE folder or .zip)")
    if not path.is_dir() and not zipfile.is_zipfile(path) and not filetree.is_zip(path):
        raise DataError(f"{path}: neither a folder nor a .zip archive; {LAYOUT}")
    counts = dict.fromkeys(CLASS_DIRS, 0)
    with filetree.Tree(path) as tree:  # refuses unsafe and bomb-like entries before anything is written
        out.parent.mkdir(parents=True, exist_ok=True)
        need, free = filetree.declared_size(path), shutil.disk_usage(out.parent).free
        if need > free:
            raise DataError(f"{path}: its entries expand to {need / 2**30:.1f} GiB, more than the "
                            f"{free / 2**30:.1f} GiB free at {out.parent}; free space or use another paths.raw")
        root = _find_root(set(tree.names()), str(path))
        prefix = f"{root}/" if root else ""
        with filetree.writer(out) as put:
            for name in tree.names():
                rel = name.removeprefix(prefix)
                folder = next((d for d in CLASS_DIRS if rel.startswith(f"{d}/")), None)
                if not name.startswith(prefix) or folder is None:
                    continue  # anything beside the class folders (a README, __MACOSX/) is not data
                put(rel, tree.read(name))
                counts[folder] += 1
    return counts


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
