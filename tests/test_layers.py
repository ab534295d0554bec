"""The library stays layered: pipeline/'s import graph (lazy imports inside functions included) has no circle, the
foundation imports nothing above it, and no library module imports a stage script, a test or a benchmark."""
from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Everything else builds on these; they import only each other.
FOUNDATION = {"errors", "classes", "io", "config"}


def imports(path: Path) -> set[str]:
    """The top-level names of what ``path`` imports, as written (``pipeline.model`` -> ``pipeline.model``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "pipeline":
                found |= {f"pipeline.{a.name}" for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    modules = {p.stem for p in (ROOT / "pipeline").glob("*.py")} - {"__init__"}
    out = {}
    for name in modules:
        used = imports(ROOT / "pipeline" / f"{name}.py")
        out[name] = {m.split(".")[1] for m in used if m.startswith("pipeline.") and m.split(".")[1] in modules}
        out[name].discard(name)
    return out


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


def test_library_never_imports_stages_tests_or_benchmarks() -> None:
    for path in (ROOT / "pipeline").glob("*.py"):
        bad = {m for m in imports(path) if m.split(".")[0] in {"src", "tests", "bench"}}
        assert not bad, f"{path.name} imports {sorted(bad)}"

