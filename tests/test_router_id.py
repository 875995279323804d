"""Issue 19 step 1: one RouterId, one parse for every public way of naming a router."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from reference import tiny_attnres

from attnres_lens.names import RouterId, UnknownRouterError
from attnres_lens.router import router_parameters

PACKAGE = Path(__file__).resolve().parents[1] / "attnres_lens"


@pytest.mark.parametrize(
    "form, name",
    [
        ("blocks.3.attn_router", "blocks.3.attn_router"),
        ("blocks.3.mlp_router.hook_weights", "blocks.3.mlp_router"),
        ("blocks.12.hook_attn_router_logits", "blocks.12.attn_router"),
        ((2, "mlp"), "blocks.2.mlp_router"),
        ("final", "final_router"),
        ("final_router", "final_router"),
        ("final_router.hook_out", "final_router"),
        ((None, "final"), "final_router"),
        (RouterId(1, "attn"), "blocks.1.attn_router"),
    ],
)
def test_parse_accepts_every_public_form(form, name):
    assert RouterId.parse(form).name == name


def test_hook_and_alias_names():
    rid = RouterId(3, "attn")
    assert rid.hook("weights") == "blocks.3.attn_router.hook_weights"
    assert rid.alias("sources") == "blocks.3.hook_attn_router_sources"
    assert RouterId.parse(rid.alias("logits")) == rid == RouterId.parse(rid.hook("out"))
    with pytest.raises(ValueError, match="no block-level alias"):
        RouterId(None, "final").alias("weights")
    with pytest.raises(ValueError, match="unknown router hook part 'pattern'"):
        rid.hook("pattern")
    with pytest.raises(Exception):
        rid.layer = 4  # frozen


def test_bad_forms_get_the_right_error():
    with pytest.raises(ValueError, match="unknown sublayer 'ffn'"):
        RouterId.parse((0, "ffn"))
    with pytest.raises(TypeError, match="layer"):  # our check, or beartype's on the annotation first
        RouterId.parse(("0", "attn"))
    with pytest.raises(TypeError, match="got int"):
        RouterId.parse(3)
    with pytest.raises(ValueError, match="unknown router 'blocks.x.attn_router'"):
        RouterId.parse("blocks.x.attn_router")


def test_model_membership_error_is_key_and_value_error():
    model = tiny_attnres("cumulative", "block", 2, 1, 0)
    with pytest.raises(KeyError, match="no router named 'blocks.9.attn_router'") as info:
        model.router("blocks.9.attn_router")
    assert isinstance(info.value, ValueError) and isinstance(info.value, UnknownRouterError)
    with pytest.raises(UnknownRouterError, match="no router named 'final_router'"):
        model.router("final")  # a cumulative model has no final router
    assert model.router((1, "mlp")) is model.blocks[1].mlp_router
    assert model.router("blocks.1.hook_mlp_router_weights") is model.blocks[1].mlp_router


def test_router_parameters_found_by_module_type():
    model = tiny_attnres("kimi", "block", 2, 1, 0)
    found = {id(p) for p in router_parameters(model)}
    expected = {id(p) for _, router in model.routers() for p in router.parameters()}
    assert found == expected and len(found) == 2 * (2 * 2 + 1)  # proj + norm per router, 5 routers
    wrapper = torch.nn.ModuleDict({"renamed": model})  # a wrapper renames every parameter
    assert {id(p) for p in router_parameters(wrapper)} == expected


def test_nothing_parses_hook_names_back():
    """Hook callbacks capture their RouterId; no module splits a hook name to find its router."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("rsplit", "split"):
                if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                    sep = node.args[0].value
                    if "hook" in sep or (sep == "." and "hook" in ast.unparse(node.func.value)):
                        offenders.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []
