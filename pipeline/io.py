"""Atomic outputs: write beside the target, then rename, so an interrupted stage never leaves a half file; the
output gets the modes the umask gives any other file."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _process_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# tempfile makes its files 0600 and folders 0700; what a stage writes gets the modes any other file of the user's
# would (a serving account or a teammate on a shared machine reads them), read once before threads start.
_UMASK = _process_umask()
FILE_MODE, DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK


def workspace_root() -> Path:
    """The DVC workspace a stage belongs to: ``DVC_ROOT``, which DVC sets for every stage and, for a queued or
    ``--temp`` experiment, points at the workspace it was queued from, not the temporary copy it runs in."""
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def shared_cache(path: str | Path) -> Path:
    """A content-keyed cache folder (``paths.features_cache``, ``paths.evaluate_cache``): a relative one is the
    workspace's, so queued and ``--temp`` experiments read what the workspace and each other computed instead of
    filling a copy DVC deletes afterwards. Entries are written atomically, so they can be shared."""
    path = Path(path)
    return path if path.is_absolute() else workspace_root() / path


def keep_newest(entries: Iterable[Path], keep: int, what: str) -> list[Path]:
    """Delete all but the ``keep`` most recently written of ``entries`` (files or folders): the bound on a
    content-keyed cache's disk use. Returns what was deleted."""
    ordered = sorted(entries, key=lambda p: p.stat().st_mtime, reverse=True)
    for old in ordered[keep:]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
        log.info("%s: removed %s", what, old)
    return ordered[keep:]


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary file path in the target's folder; on success it replaces ``target``.

    The temporary name keeps the target's suffix (Keras picks its format from it).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or target.suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it replaces ``target`` whole."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, DIR_MODE)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_json(target: str | Path, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
