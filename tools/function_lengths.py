"""Print the N longest functions and the N longest files of a package directory.

Usage: python tools/function_lengths.py attnres_lens [-n 10] [--files 5] [--body]
A function's length counts its lines from ``def`` to its last line (decorators excluded);
with ``--body`` the signature and the docstring are left out (the code a reader steps
through). Nested functions are listed on their own and also count inside their parent.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def function_lengths(root: Path, body_only: bool = False) -> list[tuple[int, int, str]]:
    """(lines, parameters, "path:qualified_name") for every function under ``root``."""
    rows = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        rows.extend(_functions_in(tree, path.relative_to(root.parent).as_posix(), "", body_only))
    return rows


def _body_start(function: ast.AST) -> int:
    """The first line after the signature and the docstring."""
    first = function.body[0]
    is_docstring = isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) and isinstance(first.value.value, str)
    if is_docstring:
        return first.end_lineno + 1 if len(function.body) > 1 else first.end_lineno
    return first.lineno


def _functions_in(node: ast.AST, path: str, prefix: str, body_only: bool) -> list[tuple[int, int, str]]:
    rows = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}{child.name}"
            arguments = child.args
            n_params = len(arguments.posonlyargs + arguments.args + arguments.kwonlyargs)
            n_params += bool(arguments.vararg) + bool(arguments.kwarg)
            start = _body_start(child) if body_only else child.lineno
            rows.append((child.end_lineno - start + 1, n_params, f"{path}:{name}"))
            rows.extend(_functions_in(child, path, f"{name}.", body_only))
        elif isinstance(child, ast.ClassDef):
            rows.extend(_functions_in(child, path, f"{prefix}{child.name}.", body_only))
    return rows


def file_lengths(root: Path) -> list[tuple[int, str]]:
    return [(len(p.read_text().splitlines()), p.relative_to(root.parent).as_posix())
            for p in sorted(root.rglob("*.py"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path, help="package directory, e.g. attnres_lens")
    parser.add_argument("-n", type=int, default=10, help="how many functions to list")
    parser.add_argument("--files", type=int, default=5, help="how many files to list")
    parser.add_argument("--body", action="store_true", help="count only the body: no signature, no docstring")
    args = parser.parse_args()
    if not args.package.is_dir():
        parser.error(f"{args.package} is not a directory")
    print(f"{'lines':>5} {'params':>6}  function")
    for lines, params, name in sorted(function_lengths(args.package, args.body), reverse=True)[: args.n]:
        print(f"{lines:>5} {params:>6}  {name}")
    print(f"\n{'lines':>5}  file")
    for lines, name in sorted(file_lengths(args.package), reverse=True)[: args.files]:
        print(f"{lines:>5}  {name}")


if __name__ == "__main__":
    main()
