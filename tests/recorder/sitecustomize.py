"""The params read-recorder, loaded at start-up by every Python process whose PYTHONPATH holds this folder (the
end-to-end test puts it there for `dvc repro`). When CIFAKE_RECORD_PARAMS names a folder, each stage writes there,
as ``<stage>.json``, the params keys it read, so tests/test_e2e.py can compare them with the keys dvc.yaml declares:
a stage cannot read a key DVC does not watch. Nothing here runs in the pipeline's own use."""
from __future__ import annotations

import os
import sys

TARGET = os.environ.get("CIFAKE_RECORD_PARAMS")


def _instrument(config) -> None:
    """Record every leaf read from a loaded ``Params`` (attribute or ``model_dump``) as a dotted key."""
    import atexit
    import json
    from pathlib import Path

    reads: set[str] = set()
    paths: dict[int, str] = {}  # id(section) -> its dotted prefix
    paused = [False]
    Section = config.Section
    plain_get, plain_dump = Section.__getattribute__, Section.model_dump

    def register(section, prefix: str = "") -> None:
        paths[id(section)] = prefix
        for name in type(section).model_fields:
            value = plain_get(section, name)
            if isinstance(value, Section):
                register(value, f"{prefix}{name}.")

    def getattribute(self, name: str):
        value = plain_get(self, name)
        if not paused[0] and not name.startswith("_") and name in type(self).model_fields \
                and not isinstance(value, Section) and id(self) in paths:
            reads.add(paths[id(self)] + name)
        return value

    def model_dump(self, *args, **kwargs):
        if not paused[0] and id(self) in paths:
            for name in type(self).model_fields:
                if name not in (kwargs.get("exclude") or ()):
                    value = plain_get(self, name)
                    if isinstance(value, Section):
                        model_dump(value)
                    else:
                        reads.add(paths[id(self)] + name)
        return plain_dump(self, *args, **kwargs)

    plain_from_dict = config.from_dict

    def from_dict(*args, **kwargs):
        params = plain_from_dict(*args, **kwargs)
        register(params)
        return params

    Section.__getattribute__, Section.model_dump, config.from_dict = getattribute, model_dump, from_dict
    config.flatten = _paused(config.flatten, paused)  # logging every value to MLflow is tracking, not a dependency

    def write() -> None:
        target = Path(TARGET) / f"{Path(sys.argv[0]).stem}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(sorted(reads)))

    atexit.register(write)
    _pause_while_tagging(paused)


def _paused(fn, paused: list[bool]):
    def call(*args, **kwargs):
        paused[0] = True
        try:
            return fn(*args, **kwargs)
        finally:
            paused[0] = False
    return call


def _pause_while_tagging(paused: list[bool]) -> None:
    """Reads made to tag an MLflow run (tracking.run_tags) are tracking, not a dependency."""
    def patch(tracking) -> None:
        tracking.run_tags = _paused(tracking.run_tags, paused)

    _after_import("pipeline.tracking", patch)


def _after_import(name: str, patch) -> None:
    """Call ``patch(module)`` once ``name`` has been imported (now, or when the stage first imports it)."""
    import importlib.abc
    import importlib.util

    if name in sys.modules:
        patch(sys.modules[name])
        return

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            plain_exec = spec.loader.exec_module

            def exec_module(module):
                plain_exec(module)
                patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Finder())


if TARGET and sys.argv and sys.argv[0].replace("\\", "/").split("/")[-2:-1] == ["src"]:
    _after_import("pipeline.config", _instrument)
