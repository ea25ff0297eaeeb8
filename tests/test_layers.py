"""The package's layers: no import cycle between its modules, counting the imports made inside
functions (read from the source with `ast`, so no import needs to run), and no module imports
the package it lives in."""

from __future__ import annotations

import ast
from pathlib import Path

import fewstep

SRC = Path(fewstep.__file__).parent


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package's __init__)."""
    found = {}
    for path in SRC.rglob("*.py"):
        parts = ["fewstep", *path.relative_to(SRC).with_suffix("").parts]
        package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source. `from X import name`
    counts as importing `X.name` when that is a module, else `X` itself."""
    modules = _modules()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, (path, package) in modules.items():
        here = module if package else module.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Import):
                targets = [owner(alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[:len(here.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules
                           else owner(source) for alias in node.names]
            else:
                continue
            edges.update(t for t in targets if t and t.startswith("fewstep") and t != module)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_counting_imports_inside_functions():
    graph = import_graph()
    assert len(graph) > 50 and "fewstep.build" in graph["fewstep.cli"]
    assert cycles(graph) == []


def test_no_module_imports_the_package_it_lives_in():
    graph = import_graph()
    modules = _modules()
    for module, edges in graph.items():
        packages = {module.rsplit(".", n)[0] for n in range(1, module.count(".") + 1)}
        packages = {p for p in packages if modules.get(p, (None, False))[1]}
        assert not edges & packages, (module, edges & packages)


def test_the_checks_find_what_they_look_for():
    """A cycle and a module importing its own package are found when they exist."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
