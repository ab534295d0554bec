"""The library stays layered: pipeline/'s import graph (lazy imports inside functions included) has no circle, the
foundation imports nothing above it, each sub-package imports only the ones below it, and no library module
imports a stage script, a test or a benchmark."""
from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Everything else builds on these; they import only each other.
FOUNDATION = {"errors", "classes", "io", "config"}
# The sub-packages from the bottom up; "core" is the flat modules of pipeline/ itself. fit sits above judge: train
# and advtrain choose their epoch and threshold with judge's metrics and attacks.
LAYERS = ("core", "data", "model", "judge", "fit", "use")


def module_name(path: Path) -> str:
    """<repo>/pipeline/model/store.py -> ``model.store``; <repo>/pipeline/config.py -> ``config``."""
    return ".".join(path.relative_to(ROOT / "pipeline").with_suffix("").parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in (ROOT / "pipeline").rglob("*.py") if p.name != "__init__.py"}


def imports(path: Path) -> set[str]:
    """The project modules ``path`` imports, as dotted names under ``pipeline`` (``from pipeline.model import
    store`` -> ``model.store``; ``from pipeline.model.store import load`` -> ``model.store``)."""
    known, found = modules(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            if name.startswith("pipeline.") and name.removeprefix("pipeline.") in known:
                found.add(name.removeprefix("pipeline."))
    return found


def graph() -> dict[str, set[str]]:
    return {name: imports(path) - {name} for name, path in modules().items()}


def layer(module: str) -> str:
    return module.split(".")[0] if "." in module else "core"


def test_no_import_circle() -> None:
    try:
        order = list(TopologicalSorter(graph()).static_order())
    except CycleError as err:
        raise AssertionError(f"import circle in pipeline/: {' -> '.join(err.args[1])}") from None
    assert set(order) == set(graph())


def test_foundation_imports_nothing_above_it() -> None:
    g = graph()
    assert FOUNDATION <= set(g)
    for name in FOUNDATION:
        assert g[name] <= FOUNDATION, f"pipeline/{name}.py imports {sorted(g[name] - FOUNDATION)}"


def test_each_sub_package_imports_only_the_ones_below_it() -> None:
    g = graph()
    assert {layer(m) for m in g} == set(LAYERS), "a sub-package of pipeline/ is missing from LAYERS"
    for name, used in g.items():
        above = {m for m in used if LAYERS.index(layer(m)) > LAYERS.index(layer(name))}
        assert not above, f"pipeline/{name.replace('.', '/')}.py imports {sorted(above)}, above its own layer"


def test_sub_packages_re_export_nothing() -> None:
    # A stage's dvc.yaml deps are its import closure: an __init__ that imported its modules would make every
    # stage that touches one module of a sub-package depend on all of them.
    for init in (ROOT / "pipeline").rglob("__init__.py"):
        assert not imports(init), f"{init.relative_to(ROOT)} imports {sorted(imports(init))}"


def test_library_never_imports_stages_tests_or_benchmarks() -> None:
    for path in (ROOT / "pipeline").rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
        bad = {m for m in found if m.split(".")[0] in {"src", "tests", "bench"}}
        assert not bad, f"{path.name} imports {sorted(bad)}"
