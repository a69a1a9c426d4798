"""docs/architecture.md says there is no import cycle, at module level or inside functions:
this holds it. Every ``import`` of socket_echo in src/ counts (those under ``if
TYPE_CHECKING`` do not: they never run), and importing a module runs its package's
``__init__`` first, so that is an edge too."""

from __future__ import annotations

import ast
import pathlib

SRC = pathlib.Path(__file__).resolve().parent.parent / "src"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: pathlib.Path, name: str, known: set[str]) -> set[str]:
    """The socket_echo modules ``path`` imports, wherever in it, TYPE_CHECKING aside."""
    found: set[str] = set()

    class Imports(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            test = node.test
            if getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == (
                "TYPE_CHECKING"
            ):
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(a.name for a in node.names if a.name.startswith("socket_echo"))

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            module = node.module or ""
            if node.level:  # relative: from the module's package
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                module = ".".join(base[: len(base) - node.level + 1] + ([module] if module else []))
            if module.startswith("socket_echo"):
                for alias in node.names:
                    full = f"{module}.{alias.name}"
                    found.add(full if full in known else module)

    Imports().visit(ast.parse(path.read_text()))
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in (SRC / "socket_echo").rglob("*.py")}
    graph = {name: imported(path, name, set(paths)) for name, path in paths.items()}
    for name in graph:  # importing a.b.c runs a.b's __init__ first
        parts = name.split(".")
        graph[name].update(".".join(parts[:i]) for i in range(2, len(parts)))
        graph[name].discard(name)
    return graph


def cycle_from(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_there_is_no_import_cycle_at_module_level_or_inside_functions():
    graph = import_graph()
    assert len(graph) > 40  # the whole package was read
    cycle = cycle_from(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_check_finds_a_cycle_when_there_is_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert cycle_from(graph) == ["a", "b", "c", "a"]
    assert cycle_from({"a": {"b"}, "b": set()}) is None


def test_subpackage_inits_import_nothing():
    """tcp/, udp/, servers/ and tools/ with its packages: importing one module of them runs
    no other (docs/architecture.md says so)."""
    base = SRC / "socket_echo"
    inits = [base / d / "__init__.py" for d in ("tcp", "udp", "servers", "tools")]
    inits += sorted((base / "tools").glob("*/__init__.py"))
    assert len(inits) >= 8, inits
    for init in inits:
        tree = ast.parse(init.read_text())
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert not imports, f"{init} imports {ast.unparse(imports[0])}"
