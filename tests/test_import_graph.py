"""The modules of ``shmkv/`` import one way: the import graph has no cycles.

Built from the source (``ast``), not by importing, so it sees every module without running it
(or needing the extensions built). An edge ``a -> b`` is any ``import``/``from ... import`` in
``a`` that names a module ``b`` of ``shmkv`` -- at module level *and* inside functions: a
function-level import is how a loop hides (``lsm/helper.py`` imported ``LSM`` back inside
``main()``), and it is still a loop in who depends on whom, one that only stops crashing at
import time by luck of the call order. Imports under ``if TYPE_CHECKING:`` are left out: they
never run and only name types. ``from pkg import name`` is an edge to ``pkg.name`` when that is
a module, else to ``pkg``; the implicit import of a parent package (``shmkv/__init__``) is not an
edge, or every module would "depend" on whatever the package's ``__init__`` re-exports.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shmkv")


def _modules(root: str) -> dict[str, str]:
    """Dotted module name -> file, for every .py under ``root`` (a package), and every .pyi
    stub (the compiled extensions ``shmkv._core`` and ``shmkv.lsm._accel``: leaves here; what
    the Cython source imports is not Python the graph can read)."""
    base = os.path.dirname(root)
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
        for f in filenames:
            stem, ext = os.path.splitext(f)
            if ext == ".py" or (ext == ".pyi" and stem + ".py" not in filenames):
                rel = os.path.relpath(os.path.join(dirpath, stem), base)
                parts = rel.split(os.sep)
                if parts[-1] == "__init__":
                    parts.pop()
                out[".".join(parts)] = os.path.join(dirpath, f)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except the bodies of ``if TYPE_CHECKING:``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: str) -> dict[str, set[str]]:
    mods = _modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_pkg = os.path.basename(path) == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        if path.endswith(".pyi"):
            continue
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    parts = package.split(".")
                    up = node.level - 1
                    assert up < len(parts), f"{path}:{node.lineno}: relative import above shmkv"
                    parent = ".".join(parts[: len(parts) - up])
                    frm = f"{parent}.{node.module}" if node.module else parent
                else:
                    frm = node.module or ""
                targets = [
                    f"{frm}.{a.name}" if f"{frm}.{a.name}" in mods else frm for a in node.names
                ]
            for t in targets:
                # ``import shmkv.lsm.db`` names shmkv.lsm.db; a name inside a module names it.
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module."""
    return [_one_cycle(graph, set(c)) for c in tangles(graph)]


def tangles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    sccs: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth is bounded by the module count (~100)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(sccs)


def _one_cycle(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest cycle through the first module of ``comp`` (for a readable failure)."""
    start = min(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError("unreachable: a strongly connected component has a cycle")


def test_shmkv_import_graph_has_no_cycles() -> None:
    g = import_graph(ROOT)
    loops = list(tangles(g))
    cycles = [_one_cycle(g, set(c)) for c in loops]
    assert not cycles, "import cycles in shmkv/:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_checker_finds_a_cycle_and_a_function_level_import(tmp_path: object) -> None:
    """The checker itself: a loop closed by an import inside a function is found, a
    TYPE_CHECKING-only one is not."""
    import pathlib

    assert isinstance(tmp_path, pathlib.Path)
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import A\n")
    (pkg / "a.py").write_text("from .sub import b\nA = 1\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import A\n    return A\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import D\n"
    )
    (pkg / "d.py").write_text("from . import c\nD = 1\n")
    g = import_graph(str(pkg))
    assert g["pkg.a"] == {"pkg.sub.b"}
    assert g["pkg.sub.b"] == {"pkg.a"}
    assert g["pkg.c"] == set()
    assert find_cycles(g) == [["pkg.a", "pkg.sub.b", "pkg.a"]]
