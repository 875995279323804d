"""Planted ground truth (issue D §5): models whose causal structure is known by construction.

- ``planted_kimi``: at the final router, "mlp 0" has large mass (0.92..0.97) but writes only along
  a coordinate every reader removes, so it has no effect; "emb" has small mass (< 0.04) and
  carries the token identity the head needs, so removing it destroys the prediction.
- Schedules: a vanilla Qwen3 wrapped with all router queries at zero (kimi "uniform",
  cumulative "recency" with bias b) routes the same way at every token: content dependence 0.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from _attribution_models import planted_kimi, random_model

from attnres_lens import HookedAttnResTransformer, verify_schedule
from attnres_lens.attribution import (
    FLAG_CAUSAL_WITHOUT_MASS,
    FLAG_MASS_WITHOUT_CAUSAL_ROLE,
    mass_vs_effect,
    routing_statistics,
)

pytestmark = pytest.mark.filterwarnings("ignore:bootstrap CIs over only")

SEEDS = [0, 1, 2, 3, 4]


def _flags(report) -> dict[tuple[str, int], str]:
    t = report.table
    return {(r, int(s)): f for r, s, f in zip(t["router"], t["source"], t["flag"]) if f}


def _expected_flags(p) -> dict[tuple[str, int], str]:
    """Every flag the construction implies. Besides the two planted slices: the MLP router
    reads [emb, attn 0] with weights 1/2, 1/2; attn 0 is the zero vector and the MLP's output
    is removed downstream, so both of its slices carry mass 1/2 and no effect."""
    return {
        p.dead: FLAG_MASS_WITHOUT_CAUSAL_ROLE,
        p.vital: FLAG_CAUSAL_WITHOUT_MASS,
        ("blocks.0.mlp_router", 0): FLAG_MASS_WITHOUT_CAUSAL_ROLE,
        ("blocks.0.mlp_router", 1): FLAG_MASS_WITHOUT_CAUSAL_ROLE,
    }


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["zero", "mask"])
def test_planted_flags_every_seed(seed, mode):
    p = planted_kimi(seed)
    report = mass_vs_effect(p.model, p.tokens, mode=mode, n_boot=200, seed=seed)
    t = report.table.set_index(["router", "source"])
    dead, vital = t.loc[p.dead], t.loc[p.vital]
    # the construction, as measured
    assert dead["mass"] == pytest.approx(p.mass_dead, abs=1e-4)
    assert vital["mass"] == pytest.approx(p.mass_vital, abs=1e-4)
    assert abs(dead["effect"]) < 1e-3
    assert vital["effect_low"] > 0.2  # removing the information costs a lot, every resample
    # the verdicts
    assert _flags(report) == _expected_flags(p)
    flagged = report.flags.set_index(["router", "source"])
    assert flagged.loc[p.dead, "flag"] == FLAG_MASS_WITHOUT_CAUSAL_ROLE
    assert flagged.loc[p.vital, "flag"] == FLAG_CAUSAL_WITHOUT_MASS
    # per sublayer kind: the attention router has a single source (not a routing decision); the
    # MLP router's two slices tie at mass 1/2, and the one with the larger effect counts
    assert set(report.largest) == {"mlp"}
    assert report.largest["mlp"]["n_tied_for_mass"] == 2 and report.largest["mlp"]["same"]


def test_planted_flags_do_not_depend_on_the_bootstrap_seed():
    p = planted_kimi(11)
    expected = _expected_flags(p)
    for boot_seed in range(4):
        report = mass_vs_effect(p.model, p.tokens, n_boot=200, seed=boot_seed, gradient=False)
        assert _flags(report) == expected


def test_planted_rank_correlation_is_negative_at_the_final_router():
    """Over the final router alone mass and |effect| are anti-ordered (emb: least mass, most
    effect), and the report's largest-mass slice is not its largest-effect slice."""
    p = planted_kimi(3)
    report = mass_vs_effect(p.model, p.tokens, n_boot=200, seed=0)
    t = report.table[report.table["router"] == "final_router"]
    assert t.loc[t["mass"].idxmax(), "source"] == p.dead[1]
    assert t.loc[t["abs_effect"].idxmax(), "source"] == p.vital[1]
    rc = report.rank_correlation
    assert rc["spearman"]["low"] <= rc["spearman"]["estimate"] <= rc["spearman"]["high"]


def test_planted_first_order_estimate_misses_the_vital_slice():
    """The final norm is scale-invariant, so to first order removing 'emb' (which dominates
    the final router's output) only rescales it: the gradient estimate is ~0 while the exact
    effect is large. The report must list that disagreement."""
    p = planted_kimi(0)
    report = mass_vs_effect(p.model, p.tokens, n_boot=200, seed=0)
    t = report.table.set_index(["router", "source"])
    assert abs(t.loc[p.vital, "grad_estimate"]) < 0.05 * t.loc[p.vital, "effect"]
    names = set(report.gradient_agreement["disagreements"]["name"])
    assert t.loc[p.vital, "name"] in names


# ----------------------------------------------------------------------------- schedules
def _tiny_qwen3(seed: int):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    )
    return transformers.Qwen3ForCausalLM(cfg).eval()


@pytest.mark.parametrize(
    "flavour,kwargs",
    [("cumulative", dict(schedule="recency", recency_bias=2.5)), ("kimi", dict(schedule="uniform"))],
)
def test_wrapped_vanilla_model_has_zero_content_dependence(flavour, kwargs):
    hf = _tiny_qwen3(0)
    model = HookedAttnResTransformer.from_pretrained(hf, flavour=flavour, n_blocks=2, **kwargs)
    tokens = torch.randint(96, (6, 10), generator=torch.Generator().manual_seed(1))
    assert verify_schedule(model, tokens) < 1e-6
    stats = routing_statistics(model, tokens)
    # exactly zero: the weights are identical at every token, not merely close
    assert (stats.slices["content_dependence"] == 0.0).all()
    assert (stats.slices["mass_std"] == 0.0).all()
    assert (stats.routers["content_dependence"] == 0.0).all()
    assert (stats.router_families["content_dependence"] == 0.0).all()
    assert (stats.families["content_dependence"] == 0.0).all()
    assert (stats.family_bands["content_dependence"] == 0.0).all()
    assert stats.content_dependence == 0.0
    # and the mass is the schedule's
    for spec in model.router_specs:
        rows = stats.slices[stats.slices["router"] == spec.name]
        n = spec.n_sources
        if flavour == "kimi":
            expected = [1.0 / n] * n
        else:
            b = kwargs["recency_bias"]
            expected = [1 / (math.exp(b) + n - 1)] * (n - 1) + [math.exp(b) / (math.exp(b) + n - 1)]
        np.testing.assert_allclose(rows["mass"].to_numpy(), expected, atol=1e-6)


def test_cumulative_schedule_from_config_has_zero_content_dependence():
    """The same from a fresh cumulative model, queries zeroed through the state dict."""
    model = random_model("cumulative", "block", n_layers=3, seed=2, recency_bias_init=1.7)
    sd = model.state_dict()
    for spec in model.router_specs:
        sd[f"{spec.name}.proj.weight"] = torch.zeros_like(sd[f"{spec.name}.proj.weight"])
    model.load_state_dict(sd)
    tokens = torch.randint(64, (5, 9), generator=torch.Generator().manual_seed(0))
    stats = routing_statistics(model, [tokens[:2], tokens[2:, :6]])  # batches of different lengths
    assert stats.content_dependence == 0.0
    assert stats.n_prompts == 5 and stats.n_tokens == 2 * 9 + 3 * 6


def test_learned_routing_has_positive_content_dependence():
    model = random_model("kimi", "block", n_layers=2, seed=0, query_scale=1.0)
    tokens = torch.randint(64, (4, 12), generator=torch.Generator().manual_seed(0))
    stats = routing_statistics(model, tokens)
    multi = stats.routers[stats.routers["n_sources"] > 1]
    assert (multi["content_dependence"] > 0.01).all()
    assert ((stats.slices["content_dependence"] >= 0) & (stats.slices["content_dependence"] <= 1)).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing degenerate to warn about
        stats.to_markdown()
