"""Print the import graph between the modules of attnres_lens (subpackages included) and its cycles.

Eager edges are module-level imports (run on import; ``if TYPE_CHECKING:`` blocks excluded);
lazy edges are imports inside functions. Only eager cycles are import cycles. A package's
``__init__`` is the module named after the package (``attnres_lens.attribution``).
Usage: python tools/import_graph.py [package_dir]   (exit 1 when an eager cycle exists)
"""
import ast
import sys
from pathlib import Path


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module under the package directory ``root``."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def resolve(node: ast.ImportFrom, name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that ``from ... import ...`` at ``name`` loads."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    if node.level:
        package = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    submodules = {f"{base}.{a.name}" for a in node.names} & set(modules)
    # ``from . import x`` loads the submodule x; ``from .m import y`` loads the module m.
    return submodules or ({base} & set(modules))


def edges(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    eager, lazy = set(), set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # annotations only: never executed
            if isinstance(child, ast.ImportFrom):
                (lazy if in_function else eager).update(resolve(child, name, path, modules) - {name})
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(path.read_text()), False)
    return eager, lazy


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    found, stack = set(), []

    def walk(node: str) -> None:
        if node in stack:
            cycle = stack[stack.index(node):]
            start = cycle.index(min(cycle))
            found.add(tuple(cycle[start:] + cycle[:start] + [min(cycle)]))
            return
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            walk(nxt)
        stack.pop()

    for node in sorted(graph):
        walk(node)
    return sorted(found)


def main(root: Path) -> int:
    modules = module_names(root)
    eager, lazy = {}, {}
    for name, path in modules.items():
        eager[name], lazy[name] = edges(name, path, modules)
        short = lambda names: ", ".join(sorted(n.removeprefix(root.name + ".") for n in names)) or "-"  # noqa: E731
        print(f"{name.removeprefix(root.name + '.'):24} eager: {short(eager[name])}   | lazy: {short(lazy[name] - eager[name])}")
    # A package importing its own submodules (re-exports) is not a cycle: skip package -> child edges.
    not_child = {k: {t for t in v if not t.startswith(k + ".")} for k, v in eager.items()}
    eager_cycles = cycles(not_child)
    print("eager cycles:", [" -> ".join(c) for c in eager_cycles] or "none")
    combined = {k: not_child[k] | {t for t in lazy[k] if not t.startswith(k + ".")} for k in eager}
    print("cycles counting lazy imports:", [" -> ".join(c) for c in cycles(combined)] or "none")
    return 1 if eager_cycles else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parents[1] / "attnres_lens")))
