"""Which project code a result depends on: the package's import graph, and a digest of that code.

dvc.yaml lists, for each stage, exactly the modules in the import closure of its script (a test derives it from
here, so the list cannot drift when code moves); the feature cache and the Optuna study are keyed by the digest of
the code that computes them, so a code change never reuses a stale result.
"""
from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pipeline"


def module_file(name: str) -> Path:
    """``pipeline.model.store`` -> <repo>/pipeline/model/store.py (a package, ``pipeline.model`` -> its
    ``__init__.py``)."""
    parts = name.split(".")
    path = ROOT.joinpath(*parts)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


@functools.cache
def _imports(path: Path) -> frozenset[str]:
    """Project modules imported anywhere in ``path``, function bodies included (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            for alias in node.names:  # `from pipeline.model import store`: a module; `from pipeline.x.y import f` not
                sub = f"{node.module}.{alias.name}"
                found.add(sub if module_file(sub).is_file() else node.module)
    # Importing pipeline.model.store runs pipeline/__init__.py and pipeline/model/__init__.py first.
    parts = [name.split(".") for name in found]
    return frozenset(".".join(p[:i]) for p in parts for i in range(1, len(p) + 1))


def closure(*entries: Path) -> list[Path]:
    """Every project module file reachable by imports from ``entries`` (themselves not included unless reached),
    sorted, relative to the repository root."""
    seen: set[Path] = set()
    todo = [Path(e).resolve() for e in entries]
    while todo:
        for name in _imports(todo.pop()):
            path = module_file(name)
            if path not in seen:
                seen.add(path)
                todo.append(path)
    return sorted(p.relative_to(ROOT) for p in seen)


def code_digest(*modules: str) -> str:
    """A short sha256 of the source of ``modules`` and everything they import from the package."""
    files = sorted({*closure(*(module_file(m) for m in modules)), *(module_file(m).relative_to(ROOT) for m in modules)})
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.as_posix().encode() + b"\0" + (ROOT / rel).read_bytes() + b"\0")
    return h.hexdigest()[:12]
