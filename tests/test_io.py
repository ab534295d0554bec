"""The caches' bound on disk use: the newest entries stay, the rest go (pipeline.io.keep_newest)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline import io
from pipeline.fit import features


def _aged(path: Path, age_s: int) -> Path:
    os.utime(path, (1_800_000_000 - age_s, 1_800_000_000 - age_s))
    return path


def test_keep_newest_deletes_the_oldest_files_and_folders(tmp_path: Path) -> None:
    folder = tmp_path / "old-model"
    (folder / "pass").mkdir(parents=True)
    (folder / "pass" / "p.npy").write_bytes(b"x")
    entries = [_aged(folder, 300)]
    for name, age in (("newest", 10), ("middle", 100), ("oldest-file", 200)):
        (tmp_path / name).write_bytes(b"x")
        entries.append(_aged(tmp_path / name, age))
    deleted = io.keep_newest(entries, 2, "test cache")
    assert [p.name for p in deleted] == ["oldest-file", "old-model"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["middle", "newest"]


def test_features_prune_touches_only_its_own_splits_entries(tmp_path: Path) -> None:
    for i, name in enumerate(["train-a.npy", "train-b.npy", "train-c.npy", "val-a.npy"]):
        np.save(tmp_path / name, np.zeros(1))
        _aged(tmp_path / name, 100 - i)  # written in this order: train-c is the newest train entry
    features.prune(tmp_path, "train", keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-c.npy", "val-a.npy"]


def test_atomic_outputs_get_the_modes_the_umask_gives_any_other_file(tmp_path: Path) -> None:
    # tempfile's 0600 files and 0700 folders would leave models and CSVs unreadable to a serving account
    script = """
import os, sys
from pathlib import Path
from pipeline import io
d = Path(sys.argv[1])
io.write_json(d / "a.json", {})
with io.atomic_dir(d / "folder"):
    pass
print(*(oct(os.stat(d / n).st_mode & 0o777) for n in ("a.json", "folder")))
"""
    for umask, want in ((0o022, ["0o644", "0o755"]), (0o077, ["0o600", "0o700"])):
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path / oct(umask))], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parents[1], preexec_fn=lambda m=umask: os.umask(m))
        assert out.stdout.split() == want, out.stderr
