"""Fail if mppool's modules import each other in a circle (run by ``make lint``).

Every import counts, at module level or inside a function (a function-level import only
hides a circle until that function runs), except those under ``if TYPE_CHECKING:``, which
never run. Prints the import graph with ``--graph``.

    python scripts/check_imports.py [--graph]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "mppool"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(current: str, is_pkg: bool, level: int, target: str | None) -> str:
    base = current.split(".")
    if not is_pkg:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.split(".")[0] == PACKAGE)
            elif isinstance(child, ast.ImportFrom):
                mod = resolve(name, is_pkg, child.level, child.module) if child.level \
                    else (child.module or "")
                if mod.split(".")[0] != PACKAGE:
                    continue
                for alias in child.names:  # "from . import protocol" names a module
                    sub = f"{mod}.{alias.name}"
                    found.add(sub if sub in known else mod)
            visit(child)

    visit(tree)
    found.discard(name)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parent.parent
    files = sorted((root / PACKAGE).rglob("*.py"))
    names = {module_name(f, root): f for f in files}
    known = set(names)
    graph = {}
    for name, f in names.items():
        deps = imports_of(f, name, known)
        # A package's own modules importing the package itself (its __init__) is not a cycle
        # worth reporting: __init__ only re-exports.
        graph[name] = {d for d in deps if d in known and d != PACKAGE}
    if "--graph" in argv:
        for name in sorted(graph):
            print(f"{name}: {', '.join(sorted(graph[name])) or '-'}")
    found = cycles(graph)
    for comp in found:
        print("import circle among: " + ", ".join(comp), file=sys.stderr)
    if not found:
        print(f"no import circle among {len(graph)} modules")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
