"""The import graph of ``src/remat`` has no cycle.

The graph is read from the source with :mod:`ast`, not by importing: every ``import`` and
``from ... import`` statement counts, those inside functions (lazy imports) included, since a lazy
import that closes a cycle still ties the two modules together. A name imported from a package is
an edge to the submodule of that name when there is one, else to the package's ``__init__``.
Imports under ``if TYPE_CHECKING:`` never run and are not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted((SRC / "remat").rglob("*.py"))}


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a module of remat (``None``: outside remat)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the statements under ``if TYPE_CHECKING:`` (they never run)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skipped.update(id(n) for n in ast.walk(child))
    return skipped


def _edges(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported remat module, line) for every import statement in the module ``name``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str | None, int]] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.extend((_owner(alias.name, modules), node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                target = full if full in modules else _owner(base, modules)
                found.append((target, node.lineno))
    return [(target, line) for target, line in found if target is not None and target != name]


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {module it imports: first line that imports it}, over ``src/remat``."""
    modules = _modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        targets: dict[str, int] = {}
        for target, line in _edges(name, path, modules):
            targets.setdefault(target, line)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _describe(graph: dict[str, dict[str, int]], component: list[str]) -> str:
    inside = set(component)
    lines = [
        f"  {source} -> {target} (line {line})"
        for source in component
        for target, line in sorted(graph[source].items())
        if target in inside
    ]
    return " <-> ".join(component) + "\n" + "\n".join(lines)


def test_cycle_finder_sees_a_lazy_import_cycle(tmp_path: Path) -> None:
    """The oracle itself: two modules that import each other, one lazily, form a cycle."""
    graph = {"a": {"b": 1}, "b": {"a": 7}, "c": {"a": 2}}
    assert cycles(graph) == [["a", "b"]]
    assert cycles({"a": {"b": 1}, "b": {}}) == []


def test_graph_reads_function_level_imports() -> None:
    """A lazy import inside a function is an edge (remat.apply.units imports the tracker so)."""
    graph = import_graph()
    assert "remat.profiling.tracker" in graph["remat.apply.units"]
    assert "remat.cost.model" in graph["remat.cost.distributed"]


def test_no_import_cycle_under_src_remat() -> None:
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles under src/remat:\n" + "\n".join(
        _describe(graph, component) for component in found
    )
