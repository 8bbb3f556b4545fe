"""The package's import graph: no cycles between modules, and dependencies point one way between its folders
(cli -> bench -> featurize -> training -> data -> model -> kernels; errors and files below all of them:
featurize fine-tunes its text encoder with the training package's precision and metrics). Every import
counts, a function's own included (an import deferred into a function is still a dependency)."""
from __future__ import annotations

import ast
from pathlib import Path

import cmath_mer

PACKAGE = Path(cmath_mer.__file__).parent
# a folder may import from its own rank and below; the command line's modules are ranked one by one: its
# torch-free checks and parser below the commands that import torch, main (cli/__init__) above them all
RANK = {"errors": 0, "files": 0, "paths": 0, "options": 0, "kernels": 1, "model": 2, "data": 3,
        "table_layouts": 3, "training": 4, "featurize": 5, "bench": 6, "gpucheck": 7, "prechecks": 8,
        "cli.checks": 8, "cli.parser": 8, "cli.predict_output": 8, "cli.loading": 9, "cli.train": 10,
        "cli.commands": 11, "cli": 12, "cli.__main__": 13, "__main__": 13, "__init__": 13}


def module_name(path: Path) -> str:
    parts = ("cmath_mer",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules `path` imports (relative imports resolved; `from pkg import mod` is mod)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([mod] if mod else []))
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("cmath_mer"):
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def folder(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer(name: str) -> str:
    """The RANK key of a module: its own where it has one (cli.checks), else its folder's."""
    own = ".".join(name.split(".")[1:3])
    return own if own in RANK else folder(name)


def test_dependencies_point_down_the_layers():
    bad = [f"{a} imports {b}" for a, deps in graph().items() for b in deps
           if folder(b) != "__init__" and RANK[layer(b)] > RANK[layer(a)]]
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    g = graph()
    # a package's __init__ re-exporting its modules is not a cycle with them
    edges = {a: {b for b in deps if not (a.startswith(b + ".") and modules()[b].name == "__init__.py")}
             for a, deps in g.items()}
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                cycles.append(" -> ".join(stack[stack.index(m):] + [m]))
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n)
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    """The graph is built from the source: a module that imports its importer, or a layer above, is seen."""
    known = {"cmath_mer.kernels.x", "cmath_mer.training.y"}
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from cmath_mer.training import y\n")
    assert imports_of("cmath_mer.kernels.x", src, known) == {"cmath_mer.training.y"}
    src.write_text("from ..training.y import thing\n")
    assert imports_of("cmath_mer.kernels.x", src, known) == {"cmath_mer.training.y"}
