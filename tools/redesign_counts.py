"""The counts of issue 19's "Done when", measured on a package directory (rerun before/after).

Usage: python tools/redesign_counts.py [attnres_lens] [-v]

Each count is an AST (or plain-text) rule stated next to it; ``-v`` lists what was counted.

1. flavour branches: ``Compare`` nodes that test which flavour: an operand named ``flavour``
   (a name or an attribute) against a string, or the string ``"kimi"``/``"cumulative"``,
   outside the scheme module (``scheme.py``) and ``loading.py``.
2. places that derive the layout: functions (outside ``scheme.py`` and ``loading.py``) that
   use a layout rule: ``closes_block_before``/``snapshot_after``, block arithmetic
   (``// layers_per_block`` or ``% layers_per_block``), a comparison that tests the flavour
   or the routing mode, or that build a ``DepthState`` from cached router sources
   (``DepthState(`` next to ``unbind``). Reading ``members`` or a ``RouterSpec`` is not
   deriving.
3. router resolvers: functions that turn a user's designation of a router into a router name
   or spec: any function that builds ``"blocks.{l}.{sub}_router"`` (an f-string holding
   ``blocks.`` and ``_router``), parses a hook name (``rsplit``/``split`` on a string holding
   ``hook``), or looks a router up by name (raises about "no router").
4. files a per-head routing variant would touch: source files that read a router's mass or
   query with a [batch, pos, source] or [1, d_model] assumption: they mention
   ``hook_weights``/``router_weights``/``hook_logits``/``router_logits``/``proj.weight``/
   ``.query``/``router.logits(``; plus the files defining the router and the
   layout (router.py, model.py, cache.py) if not already counted.
5. functions over 60 lines, body only (signature and docstring excluded): tools/function_lengths.py's rule.
6. lazy imports that break cycles: an import inside a function of module A of a module B
   whose eager imports reach A (so the import could not be moved to the top).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from function_lengths import function_lengths  # noqa: E402
from import_graph import edges, module_names  # noqa: E402

EXEMPT_FLAVOUR = {"scheme.py", "loading.py"}
LAYOUT_NAMES = {"closes_block_before", "snapshot_after"}
PER_HEAD = re.compile(r"hook_weights|router_weights|hook_logits|router_logits|proj\.weight|\.query\b|router\.logits\(")


def _sources(root: Path):
    for path in sorted(root.rglob("*.py")):
        yield path, path.read_text(), ast.parse(path.read_text())


def _names_in(node: ast.AST) -> set[str]:
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
    return out


def _is_flavour_compare(node: ast.AST, keys=("flavour",)) -> bool:
    """A comparison that tests *which* flavour (or mode): an operand named ``flavour`` against a
    string, or the string ``"kimi"``/``"cumulative"`` against anything. Validation against a
    tuple of names (``flavour not in FLAVOURS``) and ``flavour is None`` are not branches."""
    if not isinstance(node, ast.Compare):
        return False
    operands = [node.left, *node.comparators]
    named = any(
        (isinstance(o, ast.Name) and o.id in keys) or (isinstance(o, ast.Attribute) and o.attr in keys)
        for o in operands
    )
    strings = [o for o in operands if isinstance(o, ast.Constant) and isinstance(o.value, str)]
    return (named and bool(strings)) or any(o.value in ("kimi", "cumulative") for o in strings)


def flavour_branches(root: Path) -> list[str]:
    hits = []
    for path, _, tree in _sources(root):
        if path.name in EXEMPT_FLAVOUR:
            continue
        for node in ast.walk(tree):
            if _is_flavour_compare(node):
                hits.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return hits


def _functions(tree: ast.AST):
    """(qualified name, node) of every top-level function and method (nested ones count in their parent)."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{node.name}.{item.name}", item


def layout_derivations(root: Path) -> list[str]:
    hits = []
    for path, text, tree in _sources(root):
        if path.name in EXEMPT_FLAVOUR:
            continue
        for name, fn in _functions(tree):
            used = _names_in(fn) & LAYOUT_NAMES
            used |= {"block arithmetic"} if any(
                isinstance(n, ast.BinOp) and isinstance(n.op, (ast.FloorDiv, ast.Mod)) and "layers_per_block" in _names_in(n.right)
                for n in ast.walk(fn)
            ) else set()
            compares = any(_is_flavour_compare(n, ("flavour", "routing_mode")) for n in ast.walk(fn))
            segment = ast.get_source_segment(text, fn) or ""
            rebuilds = "DepthState(" in segment and "unbind" in segment
            if (used and name not in LAYOUT_NAMES) or compares or rebuilds:
                hits.append(f"{path.relative_to(root.parent)}:{name}")
    return hits


def router_resolvers(root: Path) -> list[str]:
    hits = []
    for path, text, tree in _sources(root):
        for name, fn in _functions(tree):
            segment = ast.get_source_segment(text, fn) or ""
            builds = any(
                isinstance(n, ast.JoinedStr)
                and "blocks." in ast.unparse(n)
                and "_router" in ast.unparse(n)
                and "hook_" not in ast.unparse(n)
                for n in ast.walk(fn)
            )
            parses = re.search(r"\.(rsplit|split)\((\"|')[^\"']*(hook|\.)[^\"']*(\"|')", segment) and "name" in segment
            body = [n for n in fn.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
            looks_up = any("no router" in ast.unparse(n) for n in body)  # an error message, not a docstring
            if builds or parses or looks_up:
                hits.append(f"{path.relative_to(root.parent)}:{name}")
    return hits


def per_head_files(root: Path) -> list[str]:
    hits = set()
    for path, text, _ in _sources(root):
        if PER_HEAD.search(text):
            hits.add(str(path.relative_to(root.parent)))
    for core in ("router.py", "model.py", "cache.py"):
        if (root / core).exists():
            hits.add(f"{root.name}/{core}")
    return sorted(hits)


def long_functions(root: Path, limit: int = 60) -> list[str]:
    return [f"{name} ({lines})" for lines, _, name in sorted(function_lengths(root, body_only=True), reverse=True)
            if lines > limit]


def cycle_breaking_lazy_imports(root: Path) -> list[str]:
    modules = module_names(root)
    eager, lazy = {}, {}
    for name, path in modules.items():
        eager[name], lazy[name] = edges(name, path, modules)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node in seen:
                continue
            seen.add(node)
            # importing a submodule runs its package's __init__ first
            parents = {".".join(node.split(".")[:i]) for i in range(1, node.count(".") + 1)}
            todo.extend((eager.get(node, set()) | parents) & set(modules))
        return False

    hits = []
    for name in sorted(modules):
        for target in sorted(lazy[name] - eager[name]):
            if reaches(target, name):
                hits.append(f"{name} -> {target}")
    return hits


COUNTS = {
    "flavour branches outside RoutingScheme/loading": flavour_branches,
    "places that derive the layout": layout_derivations,
    "router resolvers": router_resolvers,
    "files a per-head routing variant would touch": per_head_files,
    "functions over 60 lines (docstrings excluded)": long_functions,
    "lazy imports that break cycles": cycle_breaking_lazy_imports,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path, nargs="?", default=Path("attnres_lens"))
    parser.add_argument("-v", "--verbose", action="store_true", help="list what was counted")
    args = parser.parse_args()
    for title, count in COUNTS.items():
        found = count(args.package)
        print(f"{len(found):>4}  {title}")
        if args.verbose:
            for item in found:
                print(f"        {item}")


if __name__ == "__main__":
    main()
