"""dvc.yaml against the code: each stage's code dependencies are exactly the import closure of its script, and its
params are keys that exist. (What the stages really read, and what `dvc status` says after each edit, is checked
on a real run in tests/e2e/test_e2e.py.)"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import provenance

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
# Keys no stage depends on, by design: paths.* are the stage definitions themselves (templated into dvc.yaml),
# mlflow.*, tune.storage and tune.heartbeat say where runs and the study are kept and how a dead worker is noticed,
# not what they compute.
NOT_DEPENDENCIES = ("paths.", "mlflow.", "tune.storage", "tune.heartbeat")


def leaves(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        out += leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return out


def covers(declared: str, key: str) -> bool:
    return key == declared or key.startswith(declared + ".")


@pytest.mark.parametrize("stage", list(STAGES))
def test_code_deps_are_the_import_closure_of_the_stage_script(stage: str) -> None:
    script = ROOT / "src" / f"{stage}.py"
    expected = {f"src/{stage}.py", *(p.as_posix() for p in provenance.closure(script))}
    declared = {d for d in STAGES[stage]["deps"] if d.endswith(".py")}
    assert declared == expected, (f"missing: {sorted(expected - declared)}",
                                  f"not imported: {sorted(declared - expected)}")


def test_closure_follows_lazy_imports_inside_functions() -> None:
    # fit/features.py imports pipeline.data.splits and pipeline.fit.training inside a function body
    found = {p.as_posix() for p in provenance.closure(ROOT / "pipeline" / "fit" / "features.py")}
    assert {"pipeline/data/splits.py", "pipeline/fit/training.py", "pipeline/model/network.py",
            "pipeline/config.py", "pipeline/data/__init__.py"} <= found


@pytest.mark.parametrize("stage", list(STAGES))
def test_declared_params_exist_and_are_results_not_tracking(stage: str) -> None:
    keys = leaves(PARAMS)
    for declared in STAGES[stage].get("params", []):
        assert any(covers(declared, k) for k in keys), f"{stage}: {declared} is not in params.yaml"
        assert not declared.startswith(NOT_DEPENDENCIES), f"{stage}: {declared} is tracking or a path"
        assert declared not in PARAMS, f"{stage}: {declared} is a whole section; list the keys the stage reads"


def test_every_params_key_is_read_by_some_stage_or_is_deliberately_none() -> None:
    declared = [d for s in STAGES.values() for d in s.get("params", [])]
    for key in leaves(PARAMS):
        if key.startswith(NOT_DEPENDENCIES):
            continue
        assert any(covers(d, key) for d in declared), f"{key}: no stage depends on it (dead key, or a missing dep)"


def test_code_digest_changes_with_the_code(tmp_path, monkeypatch) -> None:
    root = tmp_path / "repo"
    for name in ("__init__.py", "config.py", "errors.py", "io.py", "model/__init__.py", "model/derived.py",
                 "model/network.py", "model/store.py", "fit/__init__.py"):
        (root / "pipeline" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "pipeline" / name).write_text((ROOT / "pipeline" / name).read_text())
    (root / "pipeline" / "fit" / "tuning.py").write_text("from pipeline.model import store\n")
    monkeypatch.setattr(provenance, "ROOT", root)
    provenance._imports.cache_clear()
    before = provenance.code_digest("pipeline.fit.tuning")
    with open(root / "pipeline" / "io.py", "a") as f:  # a module two imports away
        f.write("\n# changed\n")
    assert provenance.code_digest("pipeline.fit.tuning") != before
    provenance._imports.cache_clear()


def test_a_stage_runs_the_code_of_its_own_checkout(tmp_path: Path):
    """Two checkouts that differ in one module, with the environment pointing at the other one (as an editable
    install of a second clone does): the stage script imports its own."""
    repo = Path(__file__).resolve().parents[1]
    own, other = tmp_path / "own", tmp_path / "other"
    for checkout in (own, other):
        for folder in ("pipeline", "src"):
            shutil.copytree(repo / folder, checkout / folder, ignore=shutil.ignore_patterns("__pycache__"))
    with open(own / "pipeline" / "data" / "sources.py", "a") as f:
        f.write("\nraise SystemExit('imported the own checkout')\n")
    env = {**os.environ, "PYTHONPATH": str(other)}
    out = subprocess.run([sys.executable, str(own / "src" / "fetch.py")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert "imported the own checkout" in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_stage_declares_exactly_the_params_its_code_reads(stage: str) -> None:
    # Fast and static (ParamsReads below), beside the end-to-end recorder: a key dropped from one stage's params
    # while another stage keeps it (so test_every_params_key_is_read_by_some_stage still passes) fails here, and
    # so does a declared key none of the stage's code reads.
    reads = {k for k in ParamsReads(ROOT / "src" / f"{stage}.py").reads if not k.startswith(NOT_DEPENDENCIES)}
    declared = STAGES[stage].get("params", [])
    undeclared = sorted(k for k in reads if not any(covers(d, k) for d in declared))
    unread = sorted(d for d in declared if not any(covers(d, k) or covers(k, d) for k in reads))
    assert not undeclared and not unread, (f"{stage} reads, undeclared: {undeclared}", f"declared, unread: {unread}")


# --------------------------------------------------------------------------- which params each stage reads, statically


class ParamsReads:
    """The params keys a stage reads, found without running it: an abstract interpretation of its script's ``main``
    and of every project function it reaches, tracking which config section each value is (``params.evaluate`` is
    the section ``evaluate``; passed on as ``cfg``, ``cfg.diagnostic.steps`` reads ``evaluate.diagnostic.steps``;
    kept as ``self.attack`` by an ``Attacker``, its methods' ``self.attack.steps`` reads it too). Context-sensitive by
    the sections a call passes, so a function called with ``advtrain.attack`` by one stage and ``evaluate.diagnostic``
    by another reads each in its own stage. Reads made to tag or log an MLflow run (tracking.run_tags,
    config.flatten) are tracking, not dependencies, as for the end-to-end recorder."""

    SKIP = {("pipeline.tracking", "run_tags"), ("pipeline.config", "flatten")}
    ROOTS = {("pipeline.cli", "load_params"), ("pipeline.config", "load")}

    def __init__(self, script: Path):
        import ast

        from pipeline import config

        self.ast, self.config = ast, config
        self.reads: set[str] = set()
        self.fields: dict[tuple[str, str], set] = {}  # (class, attribute) -> values kept on self
        self.memo: dict = {}
        self.modules: dict[str, tuple] = {}
        self.changed = True
        main = self._module_of(script, "__stage__")[1]["main"]
        while self.changed:  # values kept on self reach methods analysed earlier: to a fixed point
            self.changed, self.memo = False, {}
            self._call(("__stage__", main, None), [], {})

    # ---- the config schema: a path's class, whether it is a leaf
    def _cls(self, path: str):
        cls = self.config.Params
        for part in filter(None, path.split(".")):
            cls = self._field_cls(cls, part)
            if cls is None:
                return None
        return cls

    def _field_cls(self, cls, name: str):
        import typing

        field = getattr(cls, "model_fields", {}).get(name)
        if field is None:
            return None
        todo = [field.annotation]
        while todo:
            t = todo.pop()
            if isinstance(t, type) and issubclass(t, self.config.Section):
                return t
            todo += typing.get_args(t)
        return None

    def _leaves(self, path: str) -> list[str]:
        cls = self._cls(path)
        out = []
        for name in cls.model_fields:
            sub = f"{path}.{name}".lstrip(".")
            out += self._leaves(sub) if self._field_cls(cls, name) else [sub]
        return out

    # ---- modules and names
    def _module_of(self, path: Path, name: str):
        if name not in self.modules:
            tree = self.ast.parse(Path(path).read_text())
            names = {}
            for node in self.ast.walk(tree):  # imports anywhere (lazy ones in functions too)
                if isinstance(node, self.ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
                    for a in node.names:
                        sub = f"{node.module}.{a.name}"
                        names[a.asname or a.name] = ("module", sub) if provenance.module_file(sub).is_file() \
                            else ("member", node.module, a.name)
            for node in tree.body:
                if isinstance(node, (self.ast.FunctionDef, self.ast.ClassDef)):
                    names[node.name] = node
            self.modules[name] = (tree, names)
        return self.modules[name]

    def _module(self, name: str):
        return self._module_of(provenance.module_file(name), name)[1]

    def _lookup(self, module: str, name: str):
        """A name in a module: ("func", module, node) | ("class", module, node) | ("module", name) | None."""
        found = self._module(module).get(name) if module != "__stage__" else self.modules[module][1].get(name)
        if isinstance(found, self.ast.FunctionDef):
            return ("func", module, found)
        if isinstance(found, self.ast.ClassDef):
            return ("class", module, found)
        if isinstance(found, tuple) and found[0] == "member":
            return self._lookup(found[1], found[2])
        return found

    # ---- values: ("sec", path) | ("obj", module, classname) | ("ref", lookup result)
    def _attr(self, values: set, name: str) -> set:
        out = set()
        for v in values:
            if v[0] == "sec":
                cls, path = self._cls(v[1]), f"{v[1]}.{name}".lstrip(".")
                if cls is None:
                    continue
                if name in cls.model_fields:
                    if self._field_cls(cls, name):
                        out.add(("sec", path))
                    else:
                        self.reads.add(path)
                elif isinstance(getattr(cls, name, None), property):
                    fn = self._method_of_config(cls, name)
                    if fn is not None:
                        out |= self._call(fn, [{v}], {})
                elif callable(getattr(cls, name, None)):
                    out.add(("bound", v, name))
            elif v[0] == "obj":
                out |= self.fields.get((v[2], name), set())
                method = self._method(v[1], v[2], name)
                if method is not None:
                    out.add(("bound", v, name))
            elif v[0] == "ref" and v[1][0] == "module":
                found = self._lookup(v[1][1], name)
                if found is not None:
                    out.add(("ref", found))
        return out

    def _method(self, module: str, cls: str, name: str):
        node = self._lookup(module, cls)
        if node is None or node[0] != "class":
            return None
        for item in node[2].body:
            if isinstance(item, self.ast.FunctionDef) and item.name == name:
                return (module, item, cls)
        return None

    def _method_of_config(self, cls, name: str):
        return self._method("pipeline.config", cls.__name__, name)

    def _invoke(self, callee: set, args: list[set], kwargs: dict[str, set]) -> set:
        out = set()
        for v in callee:
            if v[0] == "ref" and v[1][0] == "func":
                _, module, node = v[1]
                if (module, node.name) in self.ROOTS:
                    out.add(("sec", ""))
                elif (module, node.name) not in self.SKIP:
                    out |= self._call((module, node, None), args, kwargs)
            elif v[0] == "ref" and v[1][0] == "class":
                _, module, node = v[1]
                obj = ("obj", module, node.name)
                init = self._method(module, node.name, "__init__")
                if init is not None:
                    self._call(init, [{obj}, *args], kwargs)
                out.add(obj)
            elif v[0] == "bound":
                target, name = v[1], v[2]
                if target[0] == "sec":
                    if name == "model_dump":
                        self.reads.update(self._leaves(target[1]))
                    elif name == "model_copy":
                        out.add(target)
                    else:
                        fn = self._method_of_config(self._cls(target[1]), name)
                        if fn is not None:
                            out |= self._call(fn, [{target}, *args], kwargs)
                else:
                    fn = self._method(target[1], target[2], name)
                    out |= self._call(fn, [{target}, *args], kwargs)
        return out

    def _call(self, fn: tuple, args: list[set], kwargs: dict[str, set]) -> set:
        module, node, cls = fn
        params = [a.arg for a in node.args.posonlyargs + node.args.args]
        env: dict[str, set] = {}
        for name, values in zip(params, args):
            env[name] = set(values)
        for name, values in kwargs.items():
            env.setdefault(name, set()).update(values)
        key = (module, cls, node.name, node.lineno,
               tuple(sorted((k, tuple(sorted(map(repr, v)))) for k, v in env.items())))
        if key in self.memo:
            return self.memo[key]
        self.memo[key] = set()
        returns: set = set()
        for _ in range(2):  # flow-insensitive: a second pass sees what later statements bound
            for stmt in node.body:
                self._stmt(stmt, env, module, returns, cls)
        self.memo[key] = returns
        return returns

    def _bind(self, target, values: set, env: dict, cls) -> None:
        ast = self.ast
        if isinstance(target, ast.Name):
            env.setdefault(target.id, set()).update(values)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for t in target.elts:
                self._bind(t, values, env, cls)
        elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
            for owner in env.get(target.value.id, set()):
                if owner[0] == "obj" and values - self.fields.get((owner[2], target.attr), set()):
                    self.fields.setdefault((owner[2], target.attr), set()).update(values)
                    self.changed = True

    def _stmt(self, node, env: dict, module: str, returns: set, cls) -> None:
        ast = self.ast
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            value = self._expr(node.value, env, module) if node.value is not None else set()
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Tuple) and isinstance(node.value, ast.Tuple) and len(t.elts) == len(
                        node.value.elts):
                    for sub_t, sub_v in zip(t.elts, node.value.elts):  # a, b = x, y: pairwise
                        self._bind(sub_t, self._expr(sub_v, env, module), env, cls)
                else:
                    self._bind(t, value, env, cls)
            return
        if isinstance(node, ast.Return):
            if node.value is not None:
                returns |= self._expr(node.value, env, module)
            return
        if isinstance(node, (ast.For, ast.AsyncFor)):
            self._bind(node.target, self._expr(node.iter, env, module), env, cls)
        if isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                values = self._expr(item.context_expr, env, module)
                if item.optional_vars is not None:
                    self._bind(item.optional_vars, values, env, cls)
        if isinstance(node, ast.FunctionDef):  # a nested function: its body runs in this scope's environment
            for stmt in node.body:
                self._stmt(stmt, env, module, set(), cls)
            return
        if isinstance(node, ast.ClassDef):
            return
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                self._stmt(child, env, module, returns, cls)
            elif isinstance(child, ast.expr):
                self._expr(child, env, module)

    def _expr(self, node, env: dict, module: str) -> set:
        ast = self.ast
        if node is None:
            return set()
        if isinstance(node, ast.Name):
            if node.id in env:
                return env[node.id]
            found = self._lookup(module, node.id)
            return {("ref", found)} if found is not None else set()
        if isinstance(node, ast.Attribute):
            return self._attr(self._expr(node.value, env, module), node.attr)
        if isinstance(node, ast.Call):
            callee = self._expr(node.func, env, module)
            args = [self._expr(a.value if isinstance(a, ast.Starred) else a, env, module) for a in node.args]
            kwargs = {k.arg: self._expr(k.value, env, module) for k in node.keywords if k.arg}
            for k in node.keywords:
                if not k.arg:
                    self._expr(k.value, env, module)
            if isinstance(node.func, ast.Name) and node.func.id == "getattr" and len(node.args) >= 2 \
                    and isinstance(node.args[1], ast.Constant):
                return self._attr(args[0], node.args[1].value)
            return self._invoke(callee, args, kwargs)
        if isinstance(node, ast.Subscript):
            self._expr(node.slice, env, module)
            return {v for v in self._expr(node.value, env, module) if v[0] == "sec"}  # a list's item: its section
        if isinstance(node, ast.Lambda):  # its body's reads count where it is written (callbacks run it later)
            self._expr(node.body, env, module)
            return set()
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            inner = dict(env)
            for gen in node.generators:
                self._bind(gen.target, self._expr(gen.iter, inner, module), inner, None)
                for cond in gen.ifs:
                    self._expr(cond, inner, module)
            for part in ("elt", "key", "value"):
                self._expr(getattr(node, part, None), inner, module)
            return set()
        if isinstance(node, ast.IfExp):
            self._expr(node.test, env, module)
            return self._expr(node.body, env, module) | self._expr(node.orelse, env, module)
        if isinstance(node, ast.BoolOp):
            return set().union(*(self._expr(v, env, module) for v in node.values))
        if isinstance(node, (ast.Tuple, ast.List)):
            return set().union(set(), *(self._expr(e, env, module) for e in node.elts))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self._expr(child, env, module)
        return set()
