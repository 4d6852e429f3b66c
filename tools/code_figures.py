"""The code-shape figures of kitdist that issues quote: how many functions and how long (median, p90, max
lines), and the import cycles between modules and between packages, lazy (in-function) imports included.

    python tools/code_figures.py [REPO]        # REPO defaults to this checkout

Stdlib only: it reads the sources (ast), it imports nothing of kitdist.
"""

from __future__ import annotations

import ast
import statistics
import sys
from pathlib import Path


def module_files(repo: Path) -> dict[str, Path]:
    """kitdist's modules by dotted name (a package by its own name, for its __init__.py)."""
    files = {}
    for path in sorted((repo / "kitdist").rglob("*.py")):
        parts = list(path.relative_to(repo).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The module an imported dotted name lives in (`kitdist.a.b.func` -> `kitdist.a.b`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
    return [f"{base}.{alias.name}" for alias in node.names]


def _is_type_checking(node: ast.AST) -> bool:
    """An `if TYPE_CHECKING:` block (or `typing.TYPE_CHECKING`)."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"


def import_graph(repo: Path) -> dict[str, set[str]]:
    """module -> the kitdist modules it imports anywhere in its source (lazy imports included, type-only
    imports under `if TYPE_CHECKING:` not: they never run)."""
    modules = module_files(repo)
    graph = {}
    for module, path in modules.items():
        targets = set()
        tree = ast.parse(path.read_text())
        type_only = {id(n) for block in ast.walk(tree) if _is_type_checking(block) for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in type_only:  # `if TYPE_CHECKING:` imports never run: type names only
                continue
            for name in _imported(node, module, path.name == "__init__.py"):
                owner = _owner(name, modules)
                if owner is not None and owner != module:
                    targets.add(owner)
        graph[module] = targets
    return graph


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same edges between top-level parts of kitdist (kitdist.train, kitdist.config, ...)."""

    def part(module: str) -> str:
        return ".".join(module.split(".")[:2])

    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        packages.setdefault(part(module), set()).update(part(t) for t in targets if part(t) != part(module))
    return packages


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = stack[stack.index(node) :]
            del stack[stack.index(node) :]
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def function_lengths(repo: Path) -> list[int]:
    """Lines of every function and method in kitdist (decorators not counted)."""
    lengths = []
    for path in module_files(repo).values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths.append(node.end_lineno - node.lineno + 1)
    return sorted(lengths)


def main(argv: list[str]) -> int:
    repo = Path(argv[0]) if argv else Path(__file__).resolve().parents[1]
    lengths = function_lengths(repo)
    p90 = lengths[int(0.9 * (len(lengths) - 1))]
    print(
        f"functions: {len(lengths)}, median {statistics.median(lengths):g} lines, p90 {p90}, max {lengths[-1]}"
    )
    graph = import_graph(repo)
    print(f"module import cycles: {cycles(graph) or 'none'}")
    print(f"package import cycles: {cycles(package_graph(graph)) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
