"""The package's import graph runs one way: no cycle between mmscale's sub-packages (mmscale/X/
folders, and top-level modules such as train.py and cli.py, each its own node), and none between
its modules.

Every import counts, wherever it is written: at module level, inside a function (deferred), or
under TYPE_CHECKING. A deferred import that closes a cycle only hides it from the interpreter.
"""

from __future__ import annotations

import ast
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


def cycles(edges: dict[tuple[str, str], Import]) -> list[list[str]]:
    """One shortest cycle through each strongly connected group of nodes (Tarjan, then a
    breadth-first search back to the group's first node), as the list of nodes it visits."""
    graph: dict[str, set[str]] = {}
    for source, target in edges:
        graph.setdefault(source, set()).add(target)
        graph.setdefault(target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:  # recursion depth is bounded by the number of modules (~100)
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_shortest_cycle(graph, group) for group in groups]


def _shortest_cycle(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph[node] & members):
                if succ == start:
                    return paths[node] + [start]
                if succ not in paths:
                    paths[succ] = paths[node] + [succ]
                    following.append(succ)
        frontier = following
    raise AssertionError(f"{group} is strongly connected but holds no cycle through {start}")


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
    assert [described(cycle, edges) for cycle in cycles(edges)] == []


def test_no_cycle_between_modules():
    edges = edges_between(lambda module: module)
    assert [described(cycle, edges) for cycle in cycles(edges)] == []


def test_the_cycle_finder_names_a_cycle():
    edges = {(a, b): Import(a, b, f"{a}.py:1") for a, b in (("x", "y"), ("y", "z"), ("z", "x"), ("z", "w"))}
    assert [described(cycle, edges) for cycle in cycles(edges)] == [
        "x -> y -> z -> x: x.py:1 imports y; y.py:1 imports z; z.py:1 imports x"
    ]


def test_only_the_cli_imports_the_demo_generator():
    importers = {i.source for i in imports() if i.target == DEMO or i.target.startswith(DEMO + ".")}
    assert importers - DEMO_IMPORTERS - {m for m in MODULES if m == DEMO or m.startswith(DEMO + ".")} == set()
