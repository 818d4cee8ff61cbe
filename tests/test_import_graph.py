"""The `gradalign` modules import one another one way: no cycles.

The graph has an edge A -> B for every import of B written anywhere in A: at module level, inside functions and
under `if TYPE_CHECKING:` alike. A function-level import still makes A depend on B at run time; writing it inside a
function only hides a cycle (both cycles this test was written against went through one). Only what is written is
counted: importing `gradalign.data` also runs `gradalign/__init__.py`, but that implicit edge to a parent package is
not an edge here (the package's `__init__` imports are edges of their own).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "platform"
PACKAGE = "gradalign"


def module_names() -> dict[str, Path]:
    """Every module of the package by dotted name (`gradalign.data`; a package by its own name)."""
    names = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that module `name` (at `path`) imports anywhere in its text."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package, one level up per further dot
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from gradalign import data` imports the module gradalign.data; `from .config import X`, gradalign.config
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import gradalign.ray_adapter.space as s` and the like
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles of `graph`, each as [a, b, ..., a]: one per back edge of a depth-first search (none: acyclic)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_the_graph_sees_the_imports_it_should():
    graph = import_graph()
    assert "gradalign.ray_adapter.space" in graph and "gradalign.training" in graph
    assert "gradalign.config" in graph["gradalign"]  # from .config import ...
    assert "gradalign.config" in graph["gradalign.data"]  # from gradalign.config import DATASETS
    assert "gradalign.mnist1d_data" in graph["gradalign.data"]  # from gradalign import mnist1d_data
    assert "gradalign.training" in graph["gradalign"]  # inside __getattr__: function-level imports count
    assert "gradalign.ray_adapter.space" in graph["gradalign.ray_adapter"]  # from .space import ...
    assert all("torch" not in targets for targets in graph.values())  # only the package's own modules


@pytest.mark.parametrize(
    "graph, cycles",
    [
        ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c", "a"]]),
        ({"a": {"b", "c"}, "b": {"c"}, "c": {"b"}, "d": {"e"}, "e": {"d"}}, [["b", "c", "b"], ["d", "e", "d"]]),
    ],
)
def test_find_cycles(graph, cycles):
    assert find_cycles(graph) == cycles


def test_no_import_cycle_among_the_gradalign_modules():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
