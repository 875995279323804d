"""The suite's runtime type checks (tests/typecheck.py, installed by tests/conftest.py) cover the
public API, and leave out only what typecheck.py states: closures and the listed private helpers."""

import ast
import importlib
import inspect
import pathlib

import pytest
import torch
from jaxtyping import TypeCheckError

import attnres_lens
import typecheck
from attnres_lens import DepthRouter
from attnres_lens.names import router_name
from attnres_lens.components import per_head

PACKAGE = pathlib.Path(attnres_lens.__file__).parent


def _is_checked(obj) -> bool:
    """Whether ``obj`` (a function, or a class's classmethod/staticmethod/property) is, or wraps,
    a ``jaxtyping.jaxtyped`` wrapper."""
    fn = obj.fget if isinstance(obj, property) else getattr(obj, "__func__", obj)
    while fn is not None:
        code = getattr(fn, "__code__", None)
        if code is not None and "jaxtyping" in code.co_filename:
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def _resolve(name: str):
    """The live object named ``module.qualname`` (the longest importable module prefix)."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for part in parts[cut:]:
            obj = inspect.getattr_static(obj, part)
        return obj
    raise LookupError(name)


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _definitions(tree: ast.AST, scope: str):
    """Every function and class defined at module level or in a class, as ``scope.qualname``,
    with its node, including those under an ``if``/``try``; what is inside a function is left
    out (typecheck.py does not check it)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{scope}.{node.name}"
            yield name, node
            if isinstance(node, ast.ClassDef):
                yield from _definitions(node, name)
        elif not isinstance(node, ast.Lambda):
            yield from _definitions(node, scope)


def test_a_public_function_is_checked_for_shape_and_type():
    with pytest.raises(TypeCheckError, match="per_head"):
        per_head(torch.zeros(2, 3), 2)  # d_model-last 3-d input expected, a 2-d one given
    with pytest.raises(TypeCheckError, match="router_name"):
        router_name("3", "attn")  # layer is an int


def test_a_hot_public_method_stays_checked():
    router = DepthRouter(8, 1e-6, bias=False)
    stacked = torch.zeros(3, 1, 2, 8)  # batch pos source d_model
    assert router.mix(torch.zeros(3, 1, 2), stacked).shape == (3, 1, 8)
    with pytest.raises(TypeCheckError, match="mix"):
        router.mix(torch.zeros(3, 4, 2), stacked)  # logits for 4 positions, sources for 1
    assert _is_checked(inspect.getattr_static(DepthRouter, "mix"))


def test_every_unchecked_name_is_a_private_helper_that_exists_and_goes_unchecked():
    for name in sorted(typecheck.UNCHECKED):
        assert name.startswith("attnres_lens."), name
        own = name.rsplit(".", 1)[1]
        assert own.startswith("_") and not own.endswith("__"), f"{name} is not private"
        fn = _resolve(name)
        assert not _is_checked(fn), name


def test_a_private_helper_not_listed_is_checked():
    from attnres_lens import model

    assert "attnres_lens.model._target_mask" not in typecheck.UNCHECKED
    assert _is_checked(model._target_mask)
    with pytest.raises(TypeCheckError, match="_target_mask"):
        model._target_mask(None, "4")  # n_pos is an int
    assert model._target_mask(None, 4) is None


def test_the_hook_checks_everything_but_closures_and_the_list():
    """Statically, per module: the hook checks each module- and class-level definition except
    the listed ones and those marked ``@no_type_check``; the list names only definitions."""
    seen = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        source = path.read_bytes()
        defined = dict(_definitions(ast.parse(source), module))
        _, checked = typecheck.instrumented_code(source, str(path), module)
        skipped = {
            name for name, node in defined.items() if any(typecheck._no_type_check(d) for d in node.decorator_list)
        }
        under_skipped = {name for name in defined if any(name.startswith(s + ".") for s in skipped)}
        listed = typecheck.UNCHECKED & set(defined)
        assert set(checked) == set(defined) - listed - skipped - under_skipped, module
        seen |= listed
    assert seen == typecheck.UNCHECKED, typecheck.UNCHECKED - seen


def test_a_closure_is_not_checked_but_its_outer_function_is():
    from attnres_lens import sweep_engine

    assert _is_checked(sweep_engine.clean_pass)
    tree = ast.parse(inspect.getsource(sweep_engine.clean_pass.__wrapped__))
    nested = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)][1:]
    assert nested == ["capture", "hook"]
    source = "def outer(n: int):\n    def inner(x: int) -> int:\n        return x\n    return inner\n"
    code, checked = typecheck.instrumented_code(source.encode(), "<test>", "m")
    namespace: dict = {}
    exec(code, namespace)
    assert checked == ["m.outer"]
    assert namespace["outer"](1)("not an int") == "not an int"  # inner is left alone
    with pytest.raises(TypeCheckError):
        namespace["outer"]("not an int")  # outer is checked
