"""The package's import graph runs one way: no cycle between mmscale's sub-packages (mmscale/X/
folders, and top-level modules such as train.py and cli.py, each its own node), and none between
its modules.

Every import counts, wherever it is written: at module level, inside a function (deferred), or
under TYPE_CHECKING. A deferred import that closes a cycle only hides it from the interpreter.
"""

from __future__ import annotations

import ast
import graphlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.recipes import REPO

PACKAGE = REPO / "mmscale"
# Only the CLI starts the demo corpus generator: nothing that trains, converts or evaluates may need it.
DEMO, DEMO_IMPORTERS = "mmscale.demo", {"mmscale.cli"}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, dotted
    target: str  # the module imported, dotted
    where: str  # file:line, relative to mmscale/

    def __str__(self) -> str:
        return f"{self.where} imports {self.target}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> Iterator[str]:
    """The mmscale modules `node` names: for `from P import n`, P.n where that is a module, else P."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = node.module or ""
    if node.level:  # relative: from the importing module's package, one level up per extra dot
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
    for alias in node.names:
        yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base


def imports() -> list[Import]:
    """Every import of one mmscale module by another, wherever in the file it is written."""
    found = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _imported(node, module, path.name == "__init__.py"):
                if target.split(".")[0] == "mmscale":
                    found.append(Import(module, target, f"{path.relative_to(PACKAGE)}:{node.lineno}"))
    return found


def package_of(module: str) -> str:
    """The graph node of a module: its sub-package (mmscale.X.y -> X), or the top-level module itself
    (mmscale.train -> train)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def cycle(edges: dict[tuple[str, str], Import]) -> list[str] | None:
    """A cycle of the graph, as the nodes it visits in import order (first and last the same), or None."""
    imported_by: dict[str, set[str]] = {}
    for source, target in edges:  # graphlib wants each node's predecessors: what it imports comes first
        imported_by.setdefault(source, set()).add(target)
    try:
        graphlib.TopologicalSorter(imported_by).prepare()
    except graphlib.CycleError as e:
        return list(reversed(e.args[1]))  # graphlib lists each node before the one that imports it
    return None


def described(cycle: list[str], edges: dict[tuple[str, str], Import]) -> str:
    """"a -> b -> a: a.py:3 imports mmscale.b.x; b.py:7 imports mmscale.a"."""
    steps = "; ".join(str(edges[pair]) for pair in zip(cycle, cycle[1:]))
    return f"{' -> '.join(cycle)}: {steps}"


def edges_between(node_of: Callable[[str], str]) -> dict[tuple[str, str], Import]:
    """The graph between the nodes `node_of` maps modules to, each edge with the first import that
    makes it; imports within a node are no edge."""
    edges: dict[tuple[str, str], Import] = {}
    for found in imports():
        source, target = node_of(found.source), node_of(found.target)
        if source != target:
            edges.setdefault((source, target), found)
    return edges


def test_the_imports_are_found():
    found = imports()
    # An absolute, a relative-free `from P import module`, and a deferred import the walk must see.
    assert any(i.source == "mmscale.cli" and i.target == "mmscale.train" for i in found)
    assert any(i.source == "mmscale.models" and i.target.startswith("mmscale.models.") for i in found)
    assert len({package_of(i.source) for i in found}) >= 10


def test_no_cycle_between_subpackages():
    edges = edges_between(package_of)
    found = cycle(edges)
    assert found is None, described(found, edges)


def test_no_cycle_between_modules():
    edges = edges_between(lambda module: module)
    found = cycle(edges)
    assert found is None, described(found, edges)


def test_the_cycle_finder_names_a_cycle():
    edges = {(a, b): Import(a, b, f"{a}.py:1") for a, b in (("x", "y"), ("y", "z"), ("z", "x"), ("z", "w"))}
    found = cycle(edges)
    start = found.index("x")  # graphlib may enter the cycle at any of its nodes
    assert described(found[start:-1] + found[:start + 1], edges) == (
        "x -> y -> z -> x: x.py:1 imports y; y.py:1 imports z; z.py:1 imports x"
    )
    assert cycle({(a, b): i for (a, b), i in edges.items() if (a, b) != ("z", "x")}) is None


def test_only_the_cli_imports_the_demo_generator():
    importers = {i.source for i in imports() if i.target == DEMO or i.target.startswith(DEMO + ".")}
    assert importers - DEMO_IMPORTERS - {m for m in MODULES if m == DEMO or m.startswith(DEMO + ".")} == set()
