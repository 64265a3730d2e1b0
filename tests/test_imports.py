"""No import cycles in `llama2`: read from the source, and proven by importing each module first.

The graph comes from each module's top-level imports (those under `if TYPE_CHECKING:`
never run). Importing `a.b.c` also runs the `__init__` of each package above it that
the importer is not itself inside, so those packages count as imported too: a module that
imports `llama2.weights.common` runs `llama2/weights/__init__.py` and everything that
imports. A cycle there is a real one, whatever order the modules happen to load in.

The runtime check starts one interpreter and, in dependency order, imports each module
as the first `llama2` module it loads (all of `llama2.*` cleared from `sys.modules`
before each, and a bare `llama2` package in place of `llama2/__init__.py`, which would
otherwise load everything in its own order first).
"""

from __future__ import annotations

import ast
import graphlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "llama2"


def module_files() -> dict[str, Path]:
    """Every module of the package, by dotted name (a package by its own name)."""
    modules = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _top_level_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported (not in functions or TYPE_CHECKING)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (i for child in node.orelse for i in _top_level_imports(ast.Module([child], [])))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        else:
            yield from _top_level_imports(node)


def _function_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements inside functions (run when the function is called)."""
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inside = {n for f in functions for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    yield from sorted(inside, key=lambda n: n.lineno)


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The package modules an import statement names (a submodule where `from x import y` names one)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    if node.level:
        base = module.split(".") if _is_package(module) else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    for alias in node.names:
        submodule = f"{source}.{alias.name}"
        yield submodule if submodule in MODULES else source


def _edges(module: str, nodes: Iterator[ast.Import | ast.ImportFrom]) -> set[str]:
    """What importing `module` runs first: each named module, and the packages above it not above `module`."""
    mine = set(_ancestors(module))
    found = set()
    for node in nodes:
        for target in _targets(module, node):
            if target in MODULES:
                found.update(p for p in (*_ancestors(target), target) if p not in mine and p != module)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules its import runs (top-level imports only)."""
    return {name: _edges(name, _top_level_imports(ast.parse(path.read_text()))) for name, path in MODULES.items()}


GRAPH = import_graph()


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(graph[node])
    return False


def test_the_import_graph_has_no_cycle():
    try:
        order = list(graphlib.TopologicalSorter(GRAPH).static_order())
    except graphlib.CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(reversed(error.args[1]))}")  # each imports the next
    assert set(order) == set(MODULES)


def test_no_function_level_import_dodges_a_cycle():
    """An import inside a function is fine for speed, not to hide a cycle: moved to the top, it must not make one."""
    dodges = []
    for name, path in MODULES.items():
        for node in _function_imports(ast.parse(path.read_text())):
            dodges.extend(f"{name} -> {t}" for t in _edges(name, iter([node])) if _reaches(GRAPH, t, name))
    assert dodges == []


def test_the_tokenizer_and_weights_import_at_the_top():
    """The packages of the tokenizer and of the file readers import each other's modules at module level only."""
    local = [
        f"{name}:{node.lineno}"
        for name, path in MODULES.items()
        if name.startswith(("llama2.tokenizer", "llama2.weights"))
        for node in _function_imports(ast.parse(path.read_text()))
        if any(target in MODULES for target in _targets(name, node))
    ]
    assert local == []


_IMPORT_EACH_FIRST = """
import importlib, json, sys, types, traceback
src, names = sys.argv[1], json.loads(sys.argv[2])
failed = []
for name in names:
    for loaded in [m for m in sys.modules if m == "llama2" or m.startswith("llama2.")]:
        del sys.modules[loaded]
    if name != "llama2":  # a bare package: its __init__ would load every module in its own order first
        stub = types.ModuleType("llama2")
        stub.__path__ = [src + "/llama2"]
        sys.modules["llama2"] = stub
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc(limit=-3))
print(json.dumps(failed))
"""


def test_each_module_imports_first_in_a_fresh_interpreter():
    order = list(graphlib.TopologicalSorter(GRAPH).static_order())
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH_FIRST, str(SRC), json.dumps(order)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    failed = json.loads(result.stdout.strip().splitlines()[-1])
    assert failed == [], "\n".join(failed)
