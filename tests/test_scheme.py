"""Issue 19 step 5: the routing layout stated once (RoutingScheme), and everything derived from it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from reference import tiny_attnres

from attnres_lens.scheme import EMBEDDING, SCHEMES, scheme_class
from attnres_lens.selection import duplicate_of

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from redesign_counts import flavour_branches  # noqa: E402

LAYOUTS = [(f, m, n, b) for (f, m) in SCHEMES for (n, b) in ((1, 1), (3, 3), (4, 2), (5, 2))]


def test_no_code_branches_on_the_flavour_outside_the_scheme_and_loading():
    assert flavour_branches(ROOT / "attnres_lens") == []


def _old_duplicates(specs, flavour):
    """The closed rule main used before the scheme (selection.duplicate_of of 993d2f9)."""
    out, previous = {}, 0
    for spec in specs:
        has_current = any(s.family == "current" for s in spec.sources)
        n_completed = spec.n_sources - has_current
        copies = [None] * spec.n_sources
        if flavour == "cumulative" and has_current and n_completed > previous:
            copies[-1] = n_completed - 1
        out[spec.name] = tuple(copies)
        previous = n_completed
    return out


@pytest.mark.parametrize("flavour,mode,n_layers,n_blocks", LAYOUTS)
def test_duplicates_and_final_sources_derived_from_members(flavour, mode, n_layers, n_blocks):
    model = tiny_attnres(flavour, mode, n_layers, n_blocks, 0)
    specs = model.router_specs
    if mode == "open_block":  # issue O's layout, new since main's rule: layer 0's partial is the embedding
        expected = {spec.name: (None,) * spec.n_sources for spec in specs}
        expected["blocks.0.attn_router"] = (None, 0)
        assert duplicate_of(specs) == expected
    else:
        assert duplicate_of(specs) == _old_duplicates(specs, flavour)
    if model.scheme.has_final_router:
        final = specs[-1]
        lpb = model.cfg.layers_per_block
        for k in range(model.cfg.n_sublayers):  # main's closed formula, estimate._final_source_of
            assert final.source_of(k) == (k + 1 if mode == "full" else 1 + (k // 2) // lpb)
        assert final.source_of(EMBEDDING) == 0


@pytest.mark.parametrize("flavour,mode,n_layers,n_blocks", LAYOUTS)
def test_the_three_readers_agree_on_tensors(flavour, mode, n_layers, n_blocks):
    """The forward reads what the labels say, and each source is the sum of its members."""
    model = tiny_attnres(flavour, mode, n_layers, n_blocks, 0)
    tokens = torch.randint(0, 200, (2, 5), generator=torch.Generator().manual_seed(1))
    _, cache = model.run_with_cache(tokens)
    components = {EMBEDDING: cache["hook_embed"]}
    for layer in range(n_layers):
        components[2 * layer] = cache[f"blocks.{layer}.hook_attn_out"]
        components[2 * layer + 1] = cache[f"blocks.{layer}.hook_mlp_out"]
    for spec in model.router_specs:
        sources = cache[spec.id.hook("sources")]
        assert sources.shape[2] == spec.n_sources
        for source in spec.sources:
            expected = sum(components[c] for c in sorted(source.members))
            torch.testing.assert_close(sources[:, :, source.index], expected, atol=1e-5, rtol=1e-5)


def test_flavour_facts_are_scheme_attributes():
    kimi, cumulative = scheme_class("kimi", "block"), scheme_class("cumulative", "full")
    assert kimi.has_final_router and not cumulative.has_final_router
    assert cumulative.has_residual_stream and not kimi.has_residual_stream
    assert cumulative.default_router_bias and not kimi.default_router_bias
    assert set(kimi.checkpoint_final_keys) == {"model.final_res_proj.weight", "model.final_res_norm.weight"}
    assert cumulative.checkpoint_final_keys == {}
    with pytest.raises(ValueError, match="no routing layout for flavour='kimi', routing_mode='mh'"):
        scheme_class("kimi", "mh")


def test_program_is_what_the_forward_runs():
    scheme = scheme_class("kimi", "block")(n_layers=4, layers_per_block=2)
    closes = [step.k for step in scheme.program if step.close_block]
    assert closes == [0, 4] and len(scheme.program) == 9  # 8 sublayers + the final router
    cumulative = scheme_class("cumulative", "block")(n_layers=4, layers_per_block=2)
    assert [s.k for s in cumulative.program if s.snapshot] == [3, 7] and len(cumulative.program) == 8
