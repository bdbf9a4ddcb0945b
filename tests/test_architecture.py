"""The layering of src/crepa (docs/architecture.md): the import graph has no cycles, and the lowest
layers import nothing from above. The graph is read from the source with ``ast`` (no import runs), so a
function-local import counts as well as a module-level one: none may close a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import REPO

SOURCE = REPO / "src" / "crepa"


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package at ``root`` (packages by __init__)."""
    names = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph(root: Path, module_level_only: bool = False) -> dict[str, set[str]]:
    """module -> the package's modules it imports (an import of ``a.b.c`` also runs package ``a.b``,
    unless that package encloses the importer). Relative imports are not used in crepa."""
    modules = module_names(root)
    package = root.name

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = tree.body if module_level_only else ast.walk(tree)
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
                targets = [target if target in modules else node.module for target in targets]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names if alias.name.split(".")[0] == package]
            else:
                continue
            for target in targets:
                found = resolve(target)
                parts = found.split(".") if found else []
                for depth in range(2, len(parts) + 1):
                    imported = ".".join(parts[:depth])
                    enclosing = name.startswith(imported + ".")
                    if imported in modules and imported != name and (depth == len(parts) or not enclosing):
                        graph[name].add(imported)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), and self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_graph_reader_finds_edges_and_cycles(tmp_path):
    """The reader on a package made here: a module-level cycle, a function-local one, a package edge."""
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("from pkg.sub.leaf import x\n")
    (root / "sub" / "leaf.py").write_text("x = 1\n")
    (root / "a.py").write_text("from pkg.b import y\n")
    (root / "b.py").write_text("import pkg.a\ny = 2\n")
    (root / "c.py").write_text("def f():\n    from pkg.d import z\n")
    (root / "d.py").write_text("from pkg.c import f\nz = 3\n")
    (root / "e.py").write_text("from pkg.sub.leaf import x\n")
    graph = import_graph(root)
    assert graph["pkg.e"] == {"pkg.sub", "pkg.sub.leaf"}
    assert graph["pkg.sub"] == {"pkg.sub.leaf"}  # a package importing its own module is no cycle
    assert sorted(cycles(graph)) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.d"]]
    assert cycles(import_graph(root, module_level_only=True)) == [["pkg.a", "pkg.b"]]


def test_crepa_graph_is_read():
    graph = import_graph(SOURCE)
    assert {"crepa.train.setup", "crepa.train.state", "crepa.train.step"} <= graph["crepa.train.recipe"]
    assert "crepa.rundir" in graph["crepa.runs"]


@pytest.mark.parametrize("module_level_only", [True, False], ids=["module-level", "with-function-imports"])
def test_no_import_cycles(module_level_only):
    assert cycles(import_graph(SOURCE, module_level_only)) == []


def _imports_of(graph: dict[str, set[str]], prefix: str) -> set[str]:
    return {
        target
        for name, targets in graph.items()
        if name == prefix or name.startswith(prefix + ".")
        for target in targets
    }


def test_layering():
    graph = import_graph(SOURCE)
    assert {t for t in _imports_of(graph, "crepa.align") if not t.startswith("crepa.align")} == set()
    assert graph["crepa.rundir"] == set()
    assert {t for t in _imports_of(graph, "crepa.models") if t.startswith("crepa.train")} == set()
    # the run file schema sits below the models; reading a run folder needs no trainer
    assert {t for t in graph["crepa.config"] if t.startswith(("crepa.models", "crepa.regularizer"))} == set()
    assert {t for t in graph["crepa.runs"] if t.startswith("crepa.train")} == set()
    # sampling, export, evaluation and experiments use the trainer's parts, never its loop
    for user in ("crepa.sample", "crepa.export", "crepa.eval", "crepa.experiment.runner"):
        assert "crepa.train.recipe" not in _imports_of(graph, user), user


# What each room of src/crepa may import from crepa (docs/architecture.md, top to bottom): a folder or
# module by its name under crepa; "crepa" is the package's own __init__ (its re-exports).
LOWER = {
    "rundir": set(),
    "align": set(),
    "io": set(),
    "logs": set(),
    "data": {"align", "io"},
    "cache": {"data", "io"},
    "config": {"align"},
    "lock": {"config"},
    "teachers": {"align", "data"},
    "models": {"align", "config", "logs", "teachers"},
    "regularizer": {"align", "models"},
    "teacher_targets": {"align", "models", "teachers"},
    "runs": {"config", "rundir"},
    "repvideo": {"config", "models", "runs"},
    "generation": {"align", "cache", "config", "io", "models"},
    "precompute": {"cache", "config", "data", "lock", "models", "teachers"},
}
BELOW_TRAIN = set(LOWER) | {"crepa"}
UPPER = {
    "train": BELOW_TRAIN - {"crepa"},
    "plan": BELOW_TRAIN | {"train"},
    "eval": BELOW_TRAIN | {"train"},
    "sample": BELOW_TRAIN | {"train", "eval"},
    "export": BELOW_TRAIN | {"train", "eval", "sample"},
    "experiment": BELOW_TRAIN | {"train", "eval", "sample"},
    "demo": BELOW_TRAIN | {"train", "eval", "sample", "experiment"},
}


def room(module: str) -> str:
    return module.split(".")[1] if "." in module else "crepa"


@pytest.mark.parametrize("name", [*LOWER, *UPPER])
def test_each_room_imports_only_the_rooms_below_it(name):
    allowed = LOWER.get(name, UPPER.get(name))
    reached = {room(target) for target in _imports_of(import_graph(SOURCE), f"crepa.{name}")} - {name}
    assert reached <= allowed, f"crepa.{name} imports {sorted(reached - allowed)}"


def test_trainer_functions_fit_on_a_screen():
    """No function in train/ is longer than 80 lines (the loop included)."""
    long = []
    for path in sorted((SOURCE / "train").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long.append(f"{path.name}:{node.name} ({length} lines)")
    assert long == []
