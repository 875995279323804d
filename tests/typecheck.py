"""The suite's runtime type checks: as each module of ``attnres_lens`` is imported, every function
and class in it is wrapped in ``jaxtyping.jaxtyped(typechecker=beartype.beartype)``, so public
annotations, shapes included (``batch pos source``), are checked on every call.

This is what ``jaxtyping.install_import_hook`` does, the same decorator in the same places (the
innermost of a function's decorators, the outermost of a class's; ``@no_type_check`` is
respected), except for what is not checked, stated here and nowhere else:

- functions and classes defined inside a function (hooks, closures): no public API is one, and
  each was decorated anew every time its outer function ran, thousands of times a test file;
- the private helpers in :data:`UNCHECKED`, each called thousands of times a test file.

tests/test_typecheck.py holds the list to that: public functions stay checked, each listed name
exists and is private, and nothing else goes unchecked.

Our modules are compiled from source at every import, with no bytecode cache: jaxtyping's hook
points Python's cache at its own file names for every module imported while one of ours runs,
so each third-party module that one of ours imports first (3,100 of them) missed its ``.pyc`` and
was compiled again where PYTHONDONTWRITEBYTECODE is set, 11 s of a worker's 27 s start.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.machinery
import sys
from collections.abc import Iterator

PACKAGE = "attnres_lens"

#: ``module.qualname`` of the private helpers that are not checked at runtime: per-step and
#: per-router internals of the forward, name parsing, graph building and intervention compiling,
#: each called over 2,000 times by test_circuits, test_patching and test_tl_conformance.
UNCHECKED: frozenset[str] = frozenset({
    "attnres_lens.names.RouterId._parse",
    "attnres_lens.components._rotate_half",
    "attnres_lens.components.Attention._project",
    "attnres_lens.components.Attention._write",
    "attnres_lens.components.Attention._pattern_is_observed",
    "attnres_lens.model.AttnResBlock._stream_hook",
    "attnres_lens.model.AttnResBlock._hooked_resid_pre",
    "attnres_lens.model.HookedAttnResTransformer._context_for",
    "attnres_lens.model.HookedAttnResTransformer._running",
    "attnres_lens.scheme._family",
    "attnres_lens.scheme.RoutingScheme._walk",
    "attnres_lens.selection._merge_unit",
    "attnres_lens.circuits.graph._add_source",
    "attnres_lens.circuits.graph._router_label",
    "attnres_lens.interventions.compile._replace_op",
    "attnres_lens.interventions.providers.FromCache._reference_rows",
    "attnres_lens.interventions.providers.FromCache._check_run_shape",
})

DECORATOR = "__import__('jaxtyping').jaxtyped(typechecker=__import__('beartype').beartype)"


def _no_type_check(node: ast.AST) -> bool:
    """Whether a decorator is ``no_type_check`` (``typing.no_type_check``, called or not)."""
    if isinstance(node, ast.Call):
        node = node.func
    return getattr(node, "id", getattr(node, "attr", None)) == "no_type_check"


class Instrument(ast.NodeTransformer):
    """Adds :data:`DECORATOR` to the module-level functions and classes of one module, to the
    methods and classes in those classes, and so on down, but for :data:`UNCHECKED`."""

    def __init__(self, module: str):
        self.scope = [module]  # module, then the enclosing classes
        self.checked: list[str] = []

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.ClassDef:
        if self._checks(node):
            node.decorator_list.insert(0, self._decorator(node))
            self.scope.append(node.name)
            self.generic_visit(node)
            self.scope.pop()
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.FunctionDef:
        if self._checks(node):
            node.decorator_list.append(self._decorator(node))
        return node  # what is defined inside a function is not visited

    def _checks(self, node: ast.FunctionDef | ast.ClassDef) -> bool:
        name = ".".join([*self.scope, node.name])
        if name in UNCHECKED or any(_no_type_check(d) for d in node.decorator_list):
            return False
        self.checked.append(name)
        return True

    @staticmethod
    def _decorator(node: ast.AST) -> ast.expr:
        return ast.copy_location(ast.parse(DECORATOR, mode="eval").body, node)


def instrumented_code(source: bytes, path: str, module: str) -> tuple[object, list[str]]:
    """The code of one module with the checks added, and the names it checks."""
    tree = ast.parse(source, path)
    instrument = Instrument(module)
    tree = ast.fix_missing_locations(instrument.visit(tree))
    return compile(tree, path, "exec", dont_inherit=True), instrument.checked


class _CheckedLoader(importlib.machinery.SourceFileLoader):
    def get_code(self, fullname: str) -> object:  # never a .pyc: it would hold no checks
        return instrumented_code(self.get_data(self.path), self.path, fullname)[0]


class _CheckedFinder:
    """Finds our modules as the path finder does, to be loaded by :class:`_CheckedLoader`."""

    @staticmethod
    def find_spec(fullname: str, path: object = None, target: object = None) -> object:
        if fullname != PACKAGE and not fullname.startswith(PACKAGE + "."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            spec.loader = _CheckedLoader(spec.loader.name, spec.loader.path)
        return spec


@contextlib.contextmanager
def checked_imports() -> Iterator[None]:
    """Within it, our modules are imported with the checks added."""
    if any(name == PACKAGE or name.startswith(PACKAGE + ".") for name in sys.modules):
        raise RuntimeError(f"{PACKAGE} was imported before the type-check hook; it would go unchecked")
    finder = _CheckedFinder()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
