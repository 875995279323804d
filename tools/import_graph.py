"""Print the intra-package import graph of attnres_lens and its cycles.

Eager edges are module-level imports (run on import; ``if TYPE_CHECKING:`` blocks excluded);
lazy edges are imports inside functions. Only eager cycles are import cycles.
Usage: python tools/import_graph.py [package_dir]   (exit 1 when an eager cycle exists)
"""
import ast, sys
from pathlib import Path

def edges(path: Path, pkg: str, modules: set[str]) -> tuple[set[str], set[str]]:
    eager, lazy = set(), set()
    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # annotations only: never executed
            if isinstance(child, ast.ImportFrom) and child.level == 1:
                names = [child.module] if child.module else [a.name for a in child.names]
                names = [n.split(".")[0] for n in names]
                (lazy if in_function else eager).update(n if n in modules else pkg for n in names)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))
    visit(ast.parse(path.read_text()), False)
    return eager, lazy

def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, stack = [], []
    def walk(node):
        if node in stack:
            found.append(stack[stack.index(node):] + [node]); return
        stack.append(node)
        for nxt in sorted(graph.get(node, ())): walk(nxt)
        stack.pop()
    for node in sorted(graph): walk(node)
    return sorted({tuple(c) for c in found if c[0] == min(c[:-1])})

if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parents[1] / "attnres_lens")
    modules = {p.stem if p.stem != "__init__" else p.parent.name: p
               for p in sorted(root.glob("*.py"))}
    graph, lazy_graph = {}, {}
    for name, path in modules.items():
        graph[name], lazy_graph[name] = edges(path, root.name, set(modules))
        print(f"{name:14} eager: {', '.join(sorted(graph[name])) or '-'}"
              f"   | lazy: {', '.join(sorted(lazy_graph[name] - graph[name])) or '-'}")
    eager_cycles = cycles({k: v for k, v in graph.items() if k != root.name})
    print("eager cycles:", [" -> ".join(c) for c in eager_cycles] or "none")
    combined = {k: graph[k] | lazy_graph[k] for k in graph if k != root.name}
    print("cycles counting lazy imports:", [" -> ".join(c) for c in cycles(combined)] or "none")
    sys.exit(1 if eager_cycles else 0)
