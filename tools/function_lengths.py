"""Print the N longest functions and the N longest files of a package directory.

Usage: python tools/function_lengths.py attnres_lens [-n 10] [--files 5]
A function's length counts its lines from ``def`` to its last line (decorators excluded);
nested functions are listed on their own and also count inside their parent.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def function_lengths(root: Path) -> list[tuple[int, int, str]]:
    """(lines, parameters, "path:qualified_name") for every function under ``root``."""
    rows = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        rows.extend(_functions_in(tree, path.relative_to(root.parent).as_posix(), prefix=""))
    return rows


def _functions_in(node: ast.AST, path: str, prefix: str) -> list[tuple[int, int, str]]:
    rows = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}{child.name}"
            arguments = child.args
            n_params = len(arguments.posonlyargs + arguments.args + arguments.kwonlyargs)
            n_params += bool(arguments.vararg) + bool(arguments.kwarg)
            rows.append((child.end_lineno - child.lineno + 1, n_params, f"{path}:{name}"))
            rows.extend(_functions_in(child, path, prefix=f"{name}."))
        elif isinstance(child, ast.ClassDef):
            rows.extend(_functions_in(child, path, prefix=f"{prefix}{child.name}."))
    return rows


def file_lengths(root: Path) -> list[tuple[int, str]]:
    return [(len(p.read_text().splitlines()), p.relative_to(root.parent).as_posix())
            for p in sorted(root.rglob("*.py"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path, help="package directory, e.g. attnres_lens")
    parser.add_argument("-n", type=int, default=10, help="how many functions to list")
    parser.add_argument("--files", type=int, default=5, help="how many files to list")
    args = parser.parse_args()
    if not args.package.is_dir():
        parser.error(f"{args.package} is not a directory")
    print(f"{'lines':>5} {'params':>6}  function")
    for lines, params, name in sorted(function_lengths(args.package), reverse=True)[: args.n]:
        print(f"{lines:>5} {params:>6}  {name}")
    print(f"\n{'lines':>5}  file")
    for lines, name in sorted(file_lengths(args.package), reverse=True)[: args.files]:
        print(f"{lines:>5}  {name}")


if __name__ == "__main__":
    main()
