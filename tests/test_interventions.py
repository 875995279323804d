"""Interventions on depth-source slices: definitions, identities, composition, refusals.

Real tiny models of both flavours with non-zero router queries (and biases) so routing is not
uniform. Expected values are computed by hand from the router's own tensors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference import no_hooks_left, tiny_attnres

from attnres_lens.interventions import (
    Family,
    Group,
    Intervention,
    MaskAllSourcesError,
    Slice,
    mask,
    mean_ablate,
    model_with_interventions,
    patch,
    resample,
    resample_indices,
    run_with_interventions,
    scale,
    to_hooks,
    zero,
)

ROUTER_HOOKS = ("hook_sources", "hook_logits", "hook_weights", "hook_out")


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 300, (3, 6), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def other_tokens():
    return torch.randint(0, 300, (3, 6), generator=torch.Generator().manual_seed(2))


def router_cache(model, tokens):
    """Router activations only: hooking nothing else keeps the plain (fused-attention) path,
    so values match a plain forward bit for bit."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: "_router." in n)
    return cache


def run_and_capture(model, tokens, interventions, router):
    """Logits with ``interventions`` and the router's four activations as the router saw them."""
    seen = {}

    def keep(name):
        def hook(x, hook):
            seen[name] = x.detach().clone()

        return hook

    hooks = to_hooks(model, interventions) + [(f"{router}.{h}", keep(h)) for h in ROUTER_HOOKS]
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    return logits, seen


def manual_logits(model, router_name, sources):
    """``w . RMSNorm_g(v_i)`` (+ b on the last source), written out by hand."""
    router = model.router(router_name)
    rms = sources.pow(2).mean(-1, keepdim=True).add(model.cfg.eps).rsqrt()
    keys = sources * rms * router.norm.weight
    logits = keys @ router.proj.weight[0]
    if router.bias is not None:
        logits[..., -1] += router.bias
    return logits


# ---------------------------------------------------------------------------- definitions
def test_zero_sets_weight_to_zero_others_untouched(model, tokens):
    router = "blocks.3.attn_router"
    _, clean = run_and_capture(model, tokens, [], router)
    _, hit = run_and_capture(model, tokens, [zero((router, 1))], router)
    expected = clean["hook_weights"].clone()
    expected[..., 1] = 0.0
    torch.testing.assert_close(hit["hook_weights"], expected, rtol=0, atol=0)
    # no renormalisation: the weights now sum to 1 - alpha_1
    torch.testing.assert_close(hit["hook_weights"].sum(-1), 1 - clean["hook_weights"][..., 1])
    out = (expected.unsqueeze(-1) * clean["hook_sources"]).sum(-2)
    torch.testing.assert_close(hit["hook_out"], out, rtol=1e-5, atol=1e-6)


def test_mask_renormalises_over_the_rest(model, tokens):
    router = "blocks.3.mlp_router"
    _, clean = run_and_capture(model, tokens, [], router)
    _, hit = run_and_capture(model, tokens, [mask((router, 0))], router)
    logits = manual_logits(model, router, clean["hook_sources"])
    torch.testing.assert_close(clean["hook_logits"], logits, rtol=1e-5, atol=1e-5)
    assert torch.isneginf(hit["hook_logits"][..., 0]).all()
    keep = logits[..., 1:]
    expected = torch.cat([torch.zeros_like(keep[..., :1]), keep.exp() / keep.exp().sum(-1, keepdim=True)], -1)
    torch.testing.assert_close(hit["hook_weights"], expected, rtol=1e-5, atol=1e-6)


def test_scale_multiplies_weight(model, tokens):
    router = "blocks.2.mlp_router"
    _, clean = run_and_capture(model, tokens, [], router)
    _, hit = run_and_capture(model, tokens, [scale((router, -1), 2.5)], router)
    expected = clean["hook_weights"].clone()
    expected[..., -1] *= 2.5
    torch.testing.assert_close(hit["hook_weights"], expected, rtol=0, atol=0)


@pytest.mark.parametrize("target", ["weight", "source", "contribution"])
def test_patch_targets(model, tokens, other_tokens, target):
    router, i = "blocks.3.attn_router", 1
    cache = router_cache(model, other_tokens)
    ref_w, ref_v = cache[f"{router}.hook_weights"], cache[f"{router}.hook_sources"]
    _, clean = run_and_capture(model, tokens, [], router)
    _, hit = run_and_capture(model, tokens, [patch((router, i), cache, target=target)], router)
    w, v = clean["hook_weights"], clean["hook_sources"]
    if target == "weight":
        expected_w = w.clone()
        expected_w[..., i] = ref_w[..., i]
        torch.testing.assert_close(hit["hook_weights"], expected_w, rtol=0, atol=0)
        expected_out = (expected_w.unsqueeze(-1) * v).sum(-2)
    elif target == "source":
        expected_v = v.clone()
        expected_v[:, :, i] = ref_v[:, :, i]
        torch.testing.assert_close(hit["hook_sources"], expected_v, rtol=0, atol=0)
        # the key follows the new value: every weight of the router changes
        expected_w = torch.softmax(manual_logits(model, router, expected_v), -1)
        torch.testing.assert_close(hit["hook_weights"], expected_w, rtol=1e-5, atol=1e-6)
        expected_out = (expected_w.unsqueeze(-1) * expected_v).sum(-2)
    else:
        torch.testing.assert_close(hit["hook_weights"], w, rtol=0, atol=0)  # weights untouched
        expected_out = clean["hook_out"] - w[..., i, None] * v[:, :, i] + ref_w[..., i, None] * ref_v[:, :, i]
    torch.testing.assert_close(hit["hook_out"], expected_out, rtol=1e-5, atol=1e-5)


def test_mean_over_reference_batch_and_positions(model, tokens, other_tokens):
    router, i = "blocks.2.mlp_router", 1
    cache = router_cache(model, other_tokens)
    ref_w = cache[f"{router}.hook_weights"][..., i]
    _, clean = run_and_capture(model, tokens, [], router)
    _, hit = run_and_capture(model, tokens, [mean_ablate((router, i), other_tokens)], router)
    torch.testing.assert_close(hit["hook_weights"][..., i], ref_w.mean(0).expand(3, -1), rtol=1e-6, atol=1e-7)
    _, hit = run_and_capture(model, tokens, [mean_ablate((router, i), cache, average_positions=True)], router)
    torch.testing.assert_close(hit["hook_weights"][..., i], ref_w.mean().expand(3, 6), rtol=1e-6, atol=1e-7)
    # contribution: the mean of alpha_i * v_i (not the product of means)
    ref_c = (cache[f"{router}.hook_weights"][..., i, None] * cache[f"{router}.hook_sources"][:, :, i]).mean(0)
    _, hit = run_and_capture(model, tokens, [mean_ablate((router, i), cache, target="contribution")], router)
    w, v = clean["hook_weights"], clean["hook_sources"]
    expected = clean["hook_out"] - w[..., i, None] * v[:, :, i] + ref_c
    torch.testing.assert_close(hit["hook_out"], expected, rtol=1e-5, atol=1e-5)


def test_resample_within_batch_and_from_reference(model, tokens, other_tokens):
    router, i = "blocks.3.mlp_router", 0
    _, clean = run_and_capture(model, tokens, [], router)
    perm = resample_indices(3, seed=4)
    assert (perm != torch.arange(3)).all() and sorted(perm.tolist()) == [0, 1, 2]
    _, hit = run_and_capture(model, tokens, [resample((router, i), target="source", seed=4)], router)
    torch.testing.assert_close(hit["hook_sources"][:, :, i], clean["hook_sources"][perm, :, i], rtol=0, atol=0)
    cache = router_cache(model, other_tokens)
    idx = resample_indices(3, seed=5, n_reference=3)
    _, hit = run_and_capture(model, tokens, [resample((router, i), cache, seed=5)], router)
    torch.testing.assert_close(
        hit["hook_weights"][..., i], cache[f"{router}.hook_weights"][idx, :, i], rtol=0, atol=0
    )


def test_positions_and_batch_restrict_the_cells(model, tokens):
    router = "blocks.3.attn_router"
    _, clean = run_and_capture(model, tokens, [], router)
    _, hit = run_and_capture(model, tokens, [zero((router, 0), positions=[1, -1], batch=2)], router)
    expected = clean["hook_weights"].clone()
    expected[2, [1, 5], 0] = 0.0
    torch.testing.assert_close(hit["hook_weights"], expected, rtol=0, atol=0)
    _, hit = run_and_capture(model, tokens, [zero((router, 0), positions=slice(3, None))], router)
    expected = clean["hook_weights"].clone()
    expected[:, 3:, 0] = 0.0
    torch.testing.assert_close(hit["hook_weights"], expected, rtol=0, atol=0)


def test_family_and_group_resolve(model):
    specs = {s.name: s for s in model.router_specs}
    iv = zero(Family("blocks.3.mlp_router", "history"))
    assert iv.slices(model) == [
        ("blocks.3.mlp_router", s.index) for s in specs["blocks.3.mlp_router"].sources if s.family == "history"
    ]
    group = Group(families="embedding", sublayers="attn", layers=range(2, 4))
    assert zero(group).slices(model) == [("blocks.2.attn_router", 0), ("blocks.3.attn_router", 0)]
    explicit = Group(slices=[("blocks.1.mlp_router", 1), Slice("blocks.0.mlp_router", 0)])
    assert zero(explicit).slices(model) == [("blocks.0.mlp_router", 0), ("blocks.1.mlp_router", 1)]


# ---------------------------------------------------------------------------- identities
def test_identity_interventions_are_bit_identical(model, tokens):
    with torch.no_grad():
        plain = model(tokens)
    cache = router_cache(model, tokens)
    everything = Group(label="all")
    cases = [
        [scale(everything, 1.0)],
        [patch(everything, cache, target="weight")],
        [patch(everything, cache, target="source")],
        [patch(everything, cache, target="contribution")],
        [patch(("blocks.2.attn_router", 1), cache[("blocks.2.attn_router.hook_weights")][..., 1])],
    ]
    for interventions in cases:
        with torch.no_grad():
            logits = run_with_interventions(model, tokens, interventions)
        assert torch.equal(logits, plain), interventions
    assert no_hooks_left(model)


def test_zero_all_but_one_routes_only_to_that_source(model, tokens):
    router = "blocks.3.mlp_router"
    spec = {s.name: s for s in model.router_specs}[router]
    keep = 1
    others = Group(slices=[(router, i) for i in range(spec.n_sources) if i != keep])
    _, clean = run_and_capture(model, tokens, [], router)
    alpha, v = clean["hook_weights"][..., keep, None], clean["hook_sources"][:, :, keep]

    def only(hook_value):
        return lambda x, hook: hook_value

    with torch.no_grad():
        zeroed = run_with_interventions(model, tokens, [zero(others)])
        by_hand = model.run_with_hooks(tokens, fwd_hooks=[(f"{router}.hook_out", only(alpha * v))])
        masked = run_with_interventions(model, tokens, [mask(others)])
        one_hot = F.one_hot(torch.full((3, 6), keep), spec.n_sources).float()
        routed = model.run_with_hooks(tokens, fwd_hooks=[(f"{router}.hook_weights", only(one_hot))])
    torch.testing.assert_close(zeroed, by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked, routed, rtol=1e-5, atol=1e-5)


def test_interventions_compose_in_a_list(model, tokens):
    a, b = zero(("blocks.1.mlp_router", 0)), scale(("blocks.3.attn_router", -1), 0.5)
    with torch.no_grad():
        together = run_with_interventions(model, tokens, [a, b])
        nested = model.run_with_hooks(tokens, fwd_hooks=a.to_hooks(model) + b.to_hooks(model))
        only_a = run_with_interventions(model, tokens, a)
    assert torch.equal(together, nested)
    assert not torch.equal(together, only_a)


def test_context_manager_removes_hooks_on_exception_and_leaves_model(model, tokens):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = model(tokens)
    with pytest.raises(RuntimeError, match="boom"):
        with model_with_interventions(model, [zero(("blocks.2.attn_router", 0))]) as m:
            with torch.no_grad():
                assert not torch.equal(m(tokens), plain)
            raise RuntimeError("boom")
    assert no_hooks_left(model)
    hooks = to_hooks(model, [zero(("blocks.2.attn_router", 0))])
    assert hooks and no_hooks_left(model)  # building hooks attaches nothing
    with torch.no_grad():
        assert torch.equal(model(tokens), plain)
        loss = run_with_interventions(model, tokens, [], return_type="loss")
    assert loss.ndim == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gradients_flow_through_interventions(kimi, tokens):
    cache = router_cache(kimi, tokens)
    loss = run_with_interventions(
        kimi, tokens, [patch(("blocks.3.mlp_router", 1), cache, target="contribution")], return_type="loss"
    )
    loss.backward()
    assert kimi.router("blocks.3.mlp_router").proj.weight.grad is not None
    kimi.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------- refusals
def test_refusals_name_what_is_valid(kimi, tokens, other_tokens):
    cache = router_cache(kimi, other_tokens)
    with pytest.raises(IndexError, match=r"source 3 out of range at blocks\.2\.mlp_router.*valid indices 0\.\.2"):
        to_hooks(kimi, zero(("blocks.2.mlp_router", 3)))
    # layer 2 starts kimi's second block: its attention router has no "current" source
    with pytest.raises(ValueError, match=r"'current' is absent at blocks\.2\.attn_router.*\('embedding', 'history'\)"):
        to_hooks(kimi, zero(Family("blocks.2.attn_router", "current")))
    with pytest.raises(MaskAllSourcesError, match=r"every source of blocks\.0\.attn_router"):
        to_hooks(kimi, mask(("blocks.0.attn_router", 0)))
    with pytest.raises(ValueError, match="every source"):
        run_with_interventions(kimi, tokens, [mask(("blocks.1.mlp_router", 0)), mask(("blocks.1.mlp_router", 1))])
    assert no_hooks_left(kimi)
    with pytest.raises(ValueError, match=r"must have shape \[batch, pos, 32\]"):
        to_hooks(kimi, patch(("blocks.1.mlp_router", 0), torch.zeros(3, 6, 7), target="source"))
    with pytest.raises(ValueError, match=r"shape \(3, 5\).*batch 3 and 6 positions"):
        run_with_interventions(kimi, tokens, patch(("blocks.1.mlp_router", 0), torch.zeros(3, 5)))
    with pytest.raises(ValueError, match=r"shape \(3, 6, 2\).*batch 3 and 4 positions"):
        run_with_interventions(kimi, tokens[:, :4], patch(("blocks.1.mlp_router", 0), cache))
    with pytest.raises(IndexError, match=r"positions 6 out of range.*0\.\.5"):
        run_with_interventions(kimi, tokens, zero(("blocks.1.mlp_router", 0), positions=6))
    with pytest.raises(IndexError, match=r"batch items 7 out of range"):
        run_with_interventions(kimi, tokens, zero(("blocks.1.mlp_router", 0), batch=[7]))
    assert no_hooks_left(kimi)
    partial = {k: v for k, v in cache.cache_dict.items() if not k.endswith("sources")}
    with pytest.raises(KeyError, match=r"no 'blocks\.1\.mlp_router\.hook_sources'"):
        to_hooks(kimi, patch(("blocks.1.mlp_router", 0), partial, target="source"))
    with pytest.raises(KeyError, match=r"no router named 'blocks\.9\.attn_router'"):
        to_hooks(kimi, zero(("blocks.9.attn_router", 0)))
    with pytest.raises(ValueError, match="unknown mode 'erase'; valid modes"):
        Intervention(("blocks.1.mlp_router", 0), "erase")
    with pytest.raises(ValueError, match="unknown target 'key'"):
        patch(("blocks.1.mlp_router", 0), cache, target="key")
    with pytest.raises(ValueError, match="does not apply to mode 'zero'"):
        Intervention(("blocks.1.mlp_router", 0), "zero", target="weight")
    with pytest.raises(ValueError, match="unknown family 'middle'"):
        Family("blocks.1.mlp_router", "middle")
    with pytest.raises(TypeError):
        scale(("blocks.1.mlp_router", 0), "2")
    with pytest.raises(ValueError, match="needs a reference"):
        Intervention(("blocks.1.mlp_router", 0), "mean")
    with pytest.raises(TypeError):
        Intervention(("blocks.1.mlp_router", 0), "mean", value=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="only defined for a single Slice"):
        to_hooks(kimi, patch(Family("blocks.1.mlp_router", "embedding"), torch.zeros(3, 6)))
    with pytest.raises(ValueError, match="at least 2 inputs"):
        run_with_interventions(kimi, tokens[:1], resample(("blocks.1.mlp_router", 0)))
    with pytest.raises(ValueError, match="selects no source"):
        to_hooks(kimi, zero(Group(families="current", sublayers="attn", layers=[0])))


def test_group_refusals(kimi):
    with pytest.raises(ValueError, match="empty"):
        Group(slices=[])
    with pytest.raises(ValueError, match="unknown value 'ffn'"):
        Group(sublayers="ffn")
    with pytest.raises(IndexError, match="layer 9 out of range"):
        zero(Group(layers=[9])).slices(kimi)
    with pytest.raises(TypeError):
        zero("blocks.1.mlp_router")


# ---------------------------------------------------------------------------- invariants
configs = st.tuples(
    st.sampled_from(["kimi", "cumulative"]),
    st.sampled_from(["block", "full"]),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(0, 10_000),
)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(config=configs, pick=st.integers(0, 10_000), s=st.floats(-3, 3, allow_nan=False))
def test_slice_invariants(config, pick, s):
    flavour, mode, n_layers, n_blocks, seed = config
    model = tiny_attnres(flavour, mode, n_layers, min(n_blocks, n_layers), seed)
    toks = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(seed))
    table = model.source_table()
    row = table.iloc[pick % len(table)]
    where = Slice(row.router, int(row.source))
    n_sources = int((table.router == row.router).sum())
    with torch.no_grad():
        plain = model(toks)
        cache = router_cache(model, toks)
        assert torch.equal(run_with_interventions(model, toks, scale(where, 1.0)), plain)
        for target in ("weight", "source", "contribution"):
            assert torch.equal(run_with_interventions(model, toks, patch(where, cache, target=target)), plain)
        assert torch.equal(
            run_with_interventions(model, toks, zero(where)), run_with_interventions(model, toks, scale(where, 0.0))
        )
    _, clean = run_and_capture(model, toks, [], row.router)
    _, scaled = run_and_capture(model, toks, [scale(where, s)], row.router)
    expected = clean["hook_weights"].clone()
    expected[..., int(row.source)] *= s
    torch.testing.assert_close(scaled["hook_weights"], expected, rtol=0, atol=0)
    if n_sources > 1:
        _, masked = run_and_capture(model, toks, [mask(where)], row.router)
        w = clean["hook_weights"].clone()
        w[..., int(row.source)] = 0.0
        torch.testing.assert_close(masked["hook_weights"], w / w.sum(-1, keepdim=True), rtol=1e-4, atol=1e-6)
    assert no_hooks_left(model)
