"""The package's import graph: no circles, and no library module imports an entry point.

Read from the source with `ast` (nothing is imported), counting imports inside functions and inside
`if __name__ == "__main__":` blocks too (a lazy import hides a circle from Python but not from a
reader), and every circle, a submodule importing its own package's face included.
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


def _walk(tree):
    """Every node of the module, `if __name__ == "__main__":` blocks included: such a block runs
    when the module is the program, and an import there is as much an edge as any other."""
    return ast.walk(tree)


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


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle: one per strongly connected group of modules (Tarjan), each named as
    a path [a, b, ..., a] through the group. A submodule importing its own package counts like
    any other import: the package's face imports its submodules, so that is a circle too."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[set[str]] = []

    def strongconnect(m):
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for t in sorted(graph.get(m, ())):
            if t not in index:
                strongconnect(t)
                low[m] = min(low[m], low[t])
            elif t in on_stack:
                low[m] = min(low[m], index[t])
        if low[m] == index[m]:
            group = set()
            while True:
                t = stack.pop()
                on_stack.discard(t)
                group.add(t)
                if t == m:
                    break
            if len(group) > 1 or m in graph.get(m, ()):
                groups.append(group)

    for m in sorted(graph):
        if m not in index:
            strongconnect(m)
    return sorted((_path_in(graph, g) for g in groups), key=lambda c: c[0])


def _path_in(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A circle through the group's first module, staying inside the group (breadth first, so
    the shortest one)."""
    start = min(group)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for m in frontier:
            for t in sorted(graph[m] & group):
                if t == start:
                    path = [m]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start] + path[::-1][1:] + [start] if m != start else [start, start]
                if t not in prev:
                    prev[t] = m
                    nxt.append(t)
        frontier = nxt
    raise AssertionError(f"no circle in {sorted(group)}")  # pragma: no cover - a group has one


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    cycles = find_cycles(graph)
    return cycles[0] if cycles else None


def test_the_package_has_no_import_circle():
    cycles = find_cycles(import_graph())
    assert len(cycles) == 0, f"{len(cycles)} import circle(s): " + "; ".join(" -> ".join(c) for c in cycles)


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
    # every circle is counted, each named once, and a package with its submodule is one
    two = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert find_cycles(two) == [["a", "b", "a"], ["c", "d", "e", "c"]]
    assert find_cycles({"p": {"p.sub"}, "p.sub": {"p"}}) == [["p", "p.sub", "p"]]
    # imports inside functions and inside `if __name__ == "__main__":` are both edges
    tree = ast.parse("def f():\n    from .x import y\nif __name__ == '__main__':\n    from .cli import main\n")
    assert sorted(n.module for n in _walk(tree) if isinstance(n, ast.ImportFrom)) == ["cli", "x"]


def test_python_m_evaluate_still_reaches_the_command_line():
    """evaluate.py hands `python -m msrnn_train.evaluate` to eval_cli by module name (runpy),
    not by importing it back: eval_cli's parser answers, and its exit code (2, a bad flag) is the
    program's. One process, to keep it cheap."""
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "-m", "msrnn_train.evaluate", "--no-such-flag"], cwd=ROOT.parent,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "evaluate: error: unrecognized arguments: --no-such-flag" in bad.stderr  # eval_cli's own line
