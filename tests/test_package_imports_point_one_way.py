"""Imports inside neox_fork point one way: no module reaches itself through the modules it imports.

Every import statement counts, wherever it is (top level, inside a function, under `if TYPE_CHECKING:`):
an import moved into a function still makes the two modules depend on each other. The graph is built from
the source with `ast`, so nothing is imported to check it; a cycle of any length fails, named module by
module.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "neox_fork"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(tree: ast.Module, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The package's modules this module's import statements name (`from neox_fork import x` names the
    module x when x is one; `from .x import y` is resolved against the module's package)."""
    here = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import neox_fork.data.x as y` -> neox_fork.data.x
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    known = set(files)
    return {name: _imported(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", known)
            for name, path in files.items()}


def _parents(name: str) -> set[str]:
    """Importing a.b.c runs a/__init__ and a/b/__init__ first: a module never 'cycles' with its packages."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles that cover every strongly connected group of two or more modules (Tarjan): the shortest
    cycle through each of its modules, each once."""
    edges = {m: {t for t in targets if t not in _parents(m) and m not in _parents(t)} for m, targets in graph.items()}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(m):
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for t in sorted(edges[m]):
            if t not in index:
                visit(t)
                low[m] = min(low[m], low[t])
            elif t in on_stack:
                low[m] = min(low[m], index[t])
        if low[m] == index[m]:
            group = []
            while True:
                t = stack.pop()
                on_stack.discard(t)
                group.append(t)
                if t == m:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for m in sorted(edges):
        if m not in index:
            visit(m)
    cycles = {}
    for group in groups:
        for start in group:
            cycle = _shortest_cycle(edges, set(group), start)
            first = cycle.index(min(cycle[:-1]))  # the same cycle found from another module: one entry
            cycles.setdefault(tuple(cycle[first:-1] + cycle[:first]), cycle[first:] + cycle[1:first + 1])
    return sorted(cycles.values())


def _shortest_cycle(edges, group: set[str], start: str) -> list[str]:
    """A shortest path from `start` back to itself inside its strongly connected group."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for m in frontier:
            for t in sorted(edges[m] & group):
                if t == start:
                    return paths[m] + [start]
                if t not in paths:
                    paths[t] = paths[m] + [t]
                    nxt.append(t)
        frontier = nxt
    return sorted(group)


def test_no_two_modules_of_the_package_import_each_other():
    graph = import_graph()
    assert "neox_fork.config.neox_config" in graph and "neox_fork.config.rules" in graph["neox_fork.config.neox_config"]
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in neox_fork (make the imports point one way):\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles)


def test_the_check_sees_function_local_typing_and_long_cycles(tmp_path):
    """The checker itself, on a package written for it: a cycle through a function-local import, one through
    `if TYPE_CHECKING:`, and a three-module one are all found; a package importing its own parts is not."""
    pkg = tmp_path / "rngdrop_pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from rngdrop_pkg import a\n",
        "a.py": "import os\n\ndef f():\n    from rngdrop_pkg import b\n",
        "b.py": "import typing\nif typing.TYPE_CHECKING:\n    from rngdrop_pkg.a import f\n",
        "c.py": "from rngdrop_pkg.sub import d\n",
        "sub/__init__.py": "",
        "sub/d.py": "from .. import e\n",
        "e.py": "import rngdrop_pkg.c as c\n",
        "f.py": "from rngdrop_pkg import a, c\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    cycles = find_cycles(import_graph(pkg))
    assert sorted(cycles) == [["rngdrop_pkg.a", "rngdrop_pkg.b", "rngdrop_pkg.a"],
                              ["rngdrop_pkg.c", "rngdrop_pkg.sub.d", "rngdrop_pkg.e", "rngdrop_pkg.c"]]
