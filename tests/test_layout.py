"""The import graph reads top to bottom: no module of a package imports, even lazily inside a function, a
module that imports it back (directly or through others)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def import_graph(package: str) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports anywhere in its source (top level or in a function)."""
    files = {f"{package}.{p.stem}" if p.stem != "__init__" else package: p for p in (REPO / package).glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in files and t != name and t != package}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[n] = 2
        path.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_find_cycle_sees_a_lazy_cycle():
    assert find_cycle({"a.base": {"a.clip"}, "a.clip": {"a.base"}}) == ["a.base", "a.clip", "a.base"]
    assert find_cycle({"a.factory": {"a.base", "a.clip"}, "a.clip": {"a.base"}, "a.base": set()}) is None


def test_annotators_import_graph_has_no_cycle():
    graph = import_graph("annotators")
    assert "annotators.factory" in graph and "annotators.clip" in graph["annotators.factory"]
    assert find_cycle(graph) is None, find_cycle(graph)
