"""Imports point one way: no two modules of a package import each other, even through others."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def module_graph(package: str) -> dict[str, set[str]]:
    """Module name -> the modules of ``package`` it imports (at any depth of its code), parents included."""
    root = REPO / package
    names = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        is_package = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in names else base for a in node.names]
            for target in targets:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
                    if ".".join(parts[:i]) in names:
                        deps.add(".".join(parts[:i]))
        deps.discard(name)
        deps -= {p for p in deps if name.startswith(p + ".")}  # a module's own parent packages run before it
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.mark.parametrize("package", ["pipelines", "landscapes"])
def test_no_import_cycle(package: str) -> None:
    cycle = find_cycle(module_graph(package))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_landscapes_imports_nothing_of_pipelines_or_the_model_zoo() -> None:
    for path in (REPO / "landscapes").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for mod in mods:
                top = mod.split(".")[0]
                assert top not in {"pipelines", "hydra", "mlflow", "torchvision", "timm", "transformers"}, f"{path}: {mod}"


def test_entry_points_are_on_top() -> None:
    """Nothing in pipelines imports an entry point (pipelines.run*, pipelines.train, pipelines.compare)."""
    entries = {"pipelines.run", "pipelines.train", "pipelines.compare"}
    graph = module_graph("pipelines")
    for name, deps in graph.items():
        if name in entries or name.startswith("pipelines.run."):
            continue
        assert not deps & entries, f"{name} imports the entry point(s) {sorted(deps & entries)}"
