"""The package's module layout: no import cycle among gpu_orthol1's modules.

The graph is read from the source with `ast`, so it holds every import a module can run: at the top
level and inside functions (the lazy imports of CuPy-, Numba- and torch-side code are where cycles
hide). Imports under `if TYPE_CHECKING:` never run and are left out. An import of a dotted name is an
edge to that module only: the parent packages' `__init__` run first, but a module importing its own
package while that package is being initialized is how every package works, not a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "gpu_orthol1"


def _sources() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package's __init__), for gpu_orthol1/ and kernels/ (which installs
    as gpu_orthol1.kernels)."""
    out = {}
    for base, name in ((ROOT / PACKAGE, PACKAGE), (ROOT / "kernels", f"{PACKAGE}.kernels")):
        for f in base.rglob("*.py"):
            parts = [name, *f.relative_to(base).with_suffix("").parts]
            is_pkg = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node that can run, at any depth."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _targets(node, module: str, is_pkg: bool, known: set[str]) -> set[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            pkg = module if is_pkg else module.rsplit(".", 1)[0]
            base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
            src = f"{base}.{node.module}" if node.module else base
        else:
            src = node.module or ""
        # `from pkg import name`: an edge to pkg.name where that is a module, else to pkg itself
        names = [f"{src}.{a.name}" if f"{src}.{a.name}" in known else src for a in node.names]
    return {n for n in names if n in known}


def import_graph() -> dict[str, set[str]]:
    """gpu_orthol1's modules and, for each, the gpu_orthol1 modules it can import."""
    src = _sources()
    known = set(src)
    graph = {}
    for module, (path, is_pkg) in src.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[module] = set().union(*(_targets(n, module, is_pkg, known) for n in _imports(tree))) - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(frozenset(comp))
    return out


def test_the_graph_sees_top_level_function_level_and_relative_imports():
    g = import_graph()
    assert "gpu_orthol1.bench.env" in g["gpu_orthol1.cli"]  # top level, absolute through a subpackage
    assert "gpu_orthol1._backends" in g["gpu_orthol1.bench.command"]  # `from .. import _backends`
    assert "gpu_orthol1" in g["gpu_orthol1.bench.methods"]  # `import gpu_orthol1 as ol1` inside a function
    assert "gpu_orthol1.kernels.sign_abs" in set().union(*g.values())  # kernels/ is gpu_orthol1.kernels


def test_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    new = [sorted(c) for c in cycles(import_graph())]
    assert not new, (
        f"import cycles among gpu_orthol1's modules: {new}; import the shared code from a "
        "module below both (see gpu_orthol1/_cliargs.py for an example)"
    )


def test_layers_contract():
    """pyproject.toml's import-linter "layers" contract (frameworks over plans over the driver over
    devices over kernels): no module imports one above it, function-level imports included."""
    pytest.importorskip("importlinter", reason="import-linter comes with the test extra")
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0, (
        "the layers contract in pyproject.toml is broken: run `lint-imports` for the offending import chains"
    )


MAX_MODULE_LINES = 500  # outside kernels/ (device code keeps a kernel and its variants together)
MAX_CLASS_LINES = 250


def test_modules_and_classes_stay_small():
    """The house rules of issue 24 as a reader can repeat them: no module of gpu_orthol1 over 500
    lines, no class over 250."""
    big_modules, big_classes = [], []
    for f in sorted((ROOT / PACKAGE).rglob("*.py")):
        text = f.read_text()
        if (n := text.count("\n")) > MAX_MODULE_LINES:
            big_modules.append(f"{f.relative_to(ROOT)}: {n} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and (n := node.end_lineno - node.lineno + 1) > MAX_CLASS_LINES:
                big_classes.append(f"{f.relative_to(ROOT)}:{node.name}: {n} lines")
    assert not big_modules, big_modules
    assert not big_classes, big_classes
