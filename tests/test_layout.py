"""The import graph reads top to bottom: no module imports, even lazily inside a function, a module that imports
it back (directly or through others), and the library (`pipeline`, `annotators`) never imports the application
(`stages`, which holds the CLI). Read from the source with `ast`, so a lazy import counts as much as a
top-level one and nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
APPLICATION = "stages"
LIBRARY = ("pipeline", "annotators")


def _modules(packages: tuple[str, ...]) -> dict[str, Path]:
    """module name -> file, for every .py under the packages (subpackages included)."""
    files = {}
    for package in packages:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imports(name: str, path: Path) -> set[str]:
    """Every module name `path` (module `name`) imports anywhere in its source, relative imports resolved;
    for `from a import b` both `a` and `a.b`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x / from ..a import b
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def import_graph(*packages: str) -> dict[str, set[str]]:
    """module -> the modules of `packages` it imports anywhere in its source (top level or in a function).
    A package's own `__init__` is left out of its modules' dependencies (importing `a.b` runs `a` first
    anyway, and the packages' __init__ files import nothing)."""
    files = _modules(packages)
    return {
        name: {t for t in imports(name, path) if t in files and t != name and t not in packages}
        for name, path in files.items()
    }


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


def test_imports_resolve_relative_and_lazy_imports(tmp_path):
    pkg = tmp_path / "a"
    pkg.mkdir()
    (pkg / "m.py").write_text("from . import x\nfrom .y import z\ndef f():\n    import stages.cli\n")
    assert imports("a.m", pkg / "m.py") == {"a", "a.x", "a.y", "a.y.z", "stages.cli"}


def test_the_library_never_imports_the_application():
    """pipeline and annotators are the library; stages (the disk-to-disk stages and the `coreg` CLI over
    them) is the application. A library module that imports a stage, even lazily, ties the two together
    (as pipeline/cli.py once did): the CLI lives in stages/cli.py."""
    offenders = {
        name: sorted(t for t in imports(name, path) if t == APPLICATION or t.startswith(APPLICATION + "."))
        for name, path in _modules(LIBRARY).items()
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    assert not (REPO / "pipeline" / "cli.py").exists()  # no shim left behind


def test_the_console_script_is_the_application_cli():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    script = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["coreg"]
    module, _, attr = script.partition(":")
    assert (module, attr) == ("stages.cli", "app")
    assert "stages.cli" in import_graph(APPLICATION)


def test_no_import_cycle_across_the_packages():
    graph = import_graph(*LIBRARY, APPLICATION)
    assert {"pipeline.coreg.step", "pipeline.baselines.dividemix", "stages.cli"} <= graph.keys()
    assert "stages.train" in graph["stages.cli"] and "pipeline.coreg.losses" in graph["pipeline.coreg.step"]
    assert find_cycle(graph) is None, find_cycle(graph)
