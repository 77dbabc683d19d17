"""The package's import graph: no circles, and no library module imports an entry point.

Read from the source with `ast` (nothing is imported), counting imports inside functions too:
a lazy import hides a circle from Python but not from a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "msrnn_train"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
# modules a user runs (`python -m ...`, `accelerate launch ...`): nothing in the library imports them
ENTRY_POINTS = {"msrnn_train.train", "msrnn_train.eval_cli", "msrnn_train.demo"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str | None:
    if node.level == 0:
        return node.module
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_main_block(node) -> bool:
    t = node.test if isinstance(node, ast.If) else None
    return (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in t.comparators))


def _walk(tree):
    """Every node, except the body of `if __name__ == "__main__":` (it runs only when the module
    is itself the program: `python -m msrnn_train.evaluate` hands over to eval_cli there)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        todo.extend(c for c in ast.iter_child_nodes(node) if not _is_main_block(c))


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports}, every import statement (top level or not)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in _walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, node, is_package)
                if base is None:
                    continue
                # `from pkg import sub` imports the submodule sub when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:  # `import a.b.c` of a package path: its nearest module
                    t = t.rpartition(".")[0]
                if t and t.startswith(PACKAGE) and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None. A submodule importing its own package
    (`from . import x`) is no circle: the package is already being run when it is imported."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = {m: WHITE for m in graph}
    stack: list[str] = []

    def visit(m):
        colour[m] = GREY
        stack.append(m)
        for t in sorted(graph[m]):
            if _is_parent_package(t, m):
                continue  # `from . import x` in a submodule imports its package: already running
            if colour[t] == GREY:
                return stack[stack.index(t):] + [t]
            if colour[t] == WHITE:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        colour[m] = BLACK
        return None

    for m in sorted(graph):
        if colour[m] == WHITE:
            found = visit(m)
            if found:
                return found
    return None


def _is_parent_package(target: str, module: str) -> bool:
    return module.startswith(target + ".")


def test_the_package_has_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_library_module_imports_an_entry_point():
    graph = import_graph()
    assert ENTRY_POINTS <= set(graph), f"entry points that are not modules: {sorted(ENTRY_POINTS - set(graph))}"
    bad = sorted(f"{m} imports {t}" for m, ts in graph.items() for t in ts
                 if t in ENTRY_POINTS and m not in ENTRY_POINTS)
    assert not bad, "; ".join(bad)


def test_the_checks_see_lazy_imports_and_would_fail():
    """The checks themselves: a function-level import is an edge, and a planted circle is found."""
    graph = import_graph()
    assert graph and all(m.startswith(PACKAGE) for m in graph)
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(planted) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    tree = ast.parse("def f():\n    from .x import y\nif __name__ == '__main__':\n    from .cli import main\n")
    assert [n.module for n in _walk(tree) if isinstance(n, ast.ImportFrom)] == ["x"]
