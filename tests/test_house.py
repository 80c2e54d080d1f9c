"""The package's import graph is a DAG: no module reaches itself through its imports, late ones included.

Every module of `conv2d` is parsed with `ast` (not imported), and every import statement counts wherever it
stands (module level, inside a function, under ``if TYPE_CHECKING``), relative or absolute. A cycle held
together by function-level imports still ties its modules into one knot: none can be read, tested or moved
without the others.

An edge goes to the module an import names: ``from . import nn`` names the module ``conv2d.nn``;
``from .backends import Backend`` names the package ``conv2d.backends`` (its ``__init__``). Parent packages
that Python loads on the way (``conv2d`` before ``conv2d.backends``) are not edges: every submodule would
otherwise depend on its package, and a package's ``__init__`` is the place that gathers its submodules.
"""

from __future__ import annotations

import ast
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np

from .conftest import require_or_skip

PACKAGE = "conv2d"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package by its dotted name; a package by its own name (its ``__init__.py``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported(module: str, is_package: bool, node: ast.AST, modules: dict[str, Path], package: str) -> set[str]:
    """The package's modules that one import statement names."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        # `from . import x` in a.b.c (level 1) is from a.b; in a package's __init__, from the package itself.
        base = module.split(".")
        base = base if is_package else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join([*base, node.module] if node.module else base)
    else:
        source = node.module or ""
    if source != package and not source.startswith(package + "."):
        return set()
    found = set()
    for alias in node.names:
        if f"{source}.{alias.name}" in modules:
            found.add(f"{source}.{alias.name}")  # a submodule by name
        elif source in modules:
            found.add(source)  # a name the module (or the package's __init__) defines
    return found


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, anywhere in its source."""
    modules = module_files(root, package)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _imported(module, path.name == "__init__.py", node, modules, package)
        edges.discard(module)
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path) through each strongly connected knot of the graph (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    knots: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            knot = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                knot.add(member)
                if member == node:
                    break
            if len(knot) > 1:
                knots.append(knot)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(knot, graph) for knot in sorted(knots, key=min)]


def _cycle_in(knot: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A closed path through the knot's first module (breadth-first: the shortest one back)."""
    start = min(knot)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & knot):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if target not in came_from:
                    came_from[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"{sorted(knot)} is not strongly connected")


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    cycles = find_cycles(graph)
    knots = []
    for cycle in cycles:
        # The cycle names one way round; the knot's other edges are what else must be cut.
        knot = _knot_of(cycle[0], graph)
        edges = [f"    {a} -> {b}" for a in sorted(knot) for b in sorted(graph[a] & knot)]
        knots.append(" -> ".join(cycle) + f"\n  the knot's {len(knot)} modules and their edges:\n" + "\n".join(edges))
    assert not cycles, "import cycles among conv2d's modules (function-level imports included):\n" + "\n".join(knots)


def _knot_of(module: str, graph: dict[str, set[str]]) -> set[str]:
    """The modules that `module` reaches and that reach it back."""

    def reach(start: str, edges: dict[str, set[str]]) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            for target in edges.get(todo.pop(), ()):
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        return seen

    backwards: dict[str, set[str]] = {}
    for source, targets in graph.items():
        for target in targets:
            backwards.setdefault(target, set()).add(source)
    return reach(module, graph) & reach(module, backwards)


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """The checker finds a cycle held by a late relative import, and one by an absolute import."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .a import f\n")
    (package / "a.py").write_text("from .sub import b\n\ndef f():\n    return b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("def g():\n    from .. import a  # late\n    return a\n")
    (package / "c.py").write_text("import pkg.d\n")
    (package / "d.py").write_text("def h():\n    from pkg.c import x\n    return x\n")
    graph = import_graph(package, "pkg")
    assert graph["pkg"] == {"pkg.a"} and graph["pkg.sub.b"] == {"pkg.a"} and graph["pkg.d"] == {"pkg.c"}
    cycles = sorted(find_cycles(graph))
    assert cycles == [["pkg.a", "pkg.sub.b", "pkg.a"], ["pkg.c", "pkg.d", "pkg.c"]]


def test_a_dask_array_reaches_conv2d_distributed_without_the_user_importing_it():
    """The dask hand-off is registered by conv2d itself: ``conv2d.distributed`` loads when a dask array arrives."""
    require_or_skip("dask.array")
    code = (
        "import sys, numpy as np, dask.array as da, conv2d\n"
        "assert 'conv2d.distributed' not in sys.modules\n"
        "rng = np.random.default_rng(0)\n"
        "x, w = rng.standard_normal((4, 2, 6, 6)), rng.standard_normal((3, 2, 3, 3))\n"
        "y = conv2d.conv2d(da.from_array(x, chunks=2), w, padding=1)\n"
        "assert isinstance(y, da.Array) and 'conv2d.distributed' in sys.modules\n"
        "assert np.allclose(y.compute(scheduler='synchronous'), conv2d.conv2d(x, w, padding=1))\n"
        "grads = conv2d.conv2d_backward(da.ones((4, 3, 6, 6), chunks=2), da.from_array(x, chunks=2), w, padding=1)\n"
        "assert all(isinstance(g, da.Array) for g in grads)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True)


def test_a_backend_still_finds_other_backends_and_unpickles():
    """The registry fills the lookups that Backend objects use (asarray from another library, unpickling)."""
    import conv2d

    backend = conv2d.get_backend("numpy")
    assert pickle.loads(pickle.dumps(backend)) is backend
    strict = require_or_skip("array_api_strict")
    values = np.arange(6.0).reshape(2, 3)
    assert np.array_equal(backend.asarray(strict.asarray(values)), values)
