"""Position-restricted exact reruns: a sweep that intervenes only at positions >= p reruns only
those positions (reading the clean keys/values of the earlier ones) and gives the numbers of
one full hooked forward per row; TL-style patching by position is served by the same engine."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference import no_hooks_left, tiny_attnres

from attnres_lens.compat import PATCHING_HAS_REDUCE, patching
from attnres_lens.components import KVCacheEntry, SharedPrefixKV
from attnres_lens.model import DepthState
from attnres_lens.patching import (
    SWEEP_COLUMNS,
    get_act_patch_routing,
    per_prompt_loss,
    routing_index_df,
    routing_patch_setter,
    sweep_sources,
)


def _copies(state: DepthState, n: int) -> DepthState:
    rep = lambda t: t.repeat(n, *([1] * (t.ndim - 1)))  # noqa: E731
    return DepthState(tuple(rep(t) for t in state.completed), None if state.current is None else rep(state.current))


# ---------------------------------------------------------------------------- the model's rerun
@pytest.mark.parametrize("flavour", ["kimi", "cumulative"])
@pytest.mark.parametrize("routing_mode", ["block", "full"])
def test_run_from_position_equals_the_full_forward(flavour, routing_mode):
    model = tiny_attnres(flavour, routing_mode, 3, 2, seed=5, n_heads=4, n_key_value_heads=2)
    tokens = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    kv = [KVCacheEntry() for _ in range(model.cfg.n_layers)]
    with torch.no_grad():
        states = model.states(tokens, kv)
        logits = model.readout(states[-1])
        torch.testing.assert_close(logits, model(tokens), atol=0, rtol=0)
        for k in (0, 3, model.cfg.n_sublayers):
            for p in (1, 5, 8):
                shared = [SharedPrefixKV(e.keys[:, :, :p], e.values[:, :, :p], copies=3) for e in kv]
                out = model.readout(model.run_from_position(_copies(states[k].from_position(p), 3), k, p, shared))
                torch.testing.assert_close(out, logits[:, p:].repeat(3, 1, 1), atol=1e-5, rtol=0)
                plain = [KVCacheEntry(e.keys[:, :, :p], e.values[:, :, :p]) for e in kv]
                out = model.readout(model.run_from_position(states[k].from_position(p), k, p, plain))
                torch.testing.assert_close(out, logits[:, p:], atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="one per layer"):
            model.run_from_position(states[0].from_position(2), 0, 2, kv[:1])


def test_shared_prefix_attention_equals_attention_over_the_copied_prefix():
    model = tiny_attnres("kimi", n_heads=4, n_key_value_heads=2)
    attn = model.blocks[0].attn
    gen = torch.Generator().manual_seed(3)
    prefix = SharedPrefixKV(torch.randn(2, 2, 5, 8, generator=gen), torch.randn(2, 2, 5, 8, generator=gen), copies=3)
    x = torch.randn(6, 4, 32, generator=gen)
    seq = model.sequence_context(4, x.device, kv_cache=[prefix] * model.cfg.n_layers)
    keys, values = prefix.extend(torch.zeros(6, 2, 0, 8), torch.zeros(6, 2, 0, 8))
    copied = KVCacheEntry(keys, values)
    patterns = []
    with torch.no_grad(), model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda p, hook: patterns.append(p))]):
        shared_out = attn(x, seq.cos, seq.sin, seq.attn_mask, prefix)
        copied_out = attn(x, seq.cos, seq.sin, seq.attn_mask, copied)
    torch.testing.assert_close(shared_out, copied_out, atol=1e-6, rtol=0)
    assert patterns[0].shape == patterns[1].shape == (6, 4, 4, 9)  # hooks see the full pattern
    torch.testing.assert_close(patterns[0], patterns[1], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="3 copies of a batch of 2"):
        prefix.extend(torch.zeros(4, 2, 1, 8), torch.zeros(4, 2, 1, 8))


# ---------------------------------------------------------------------------- sweeps
def _assert_same(a, b, atol=1e-5):
    assert list(a.columns) == list(b.columns) == list(SWEEP_COLUMNS)
    np.testing.assert_allclose(np.stack(a.effect_per_prompt), np.stack(b.effect_per_prompt), atol=atol, rtol=0)
    np.testing.assert_allclose(a.metric_ablated, b.metric_ablated, atol=atol, rtol=0)
    np.testing.assert_allclose(np.stack(a.mass_per_prompt), np.stack(b.mass_per_prompt), atol=1e-7, rtol=0)


def _positions_seen(model, fn):
    """The position counts the last layer's attention ran on, during ``fn()``."""
    seen = []
    hook = (f"blocks.{model.cfg.n_layers - 1}.attn.hook_q", lambda q, hook: seen.append(q.shape[1]))
    with model.hooks(fwd_hooks=[hook]):
        out = fn()
    return out, seen


N_POS = 7


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    config=st.tuples(
        st.sampled_from(["kimi", "cumulative"]), st.sampled_from(["block", "full"]),
        st.integers(1, 3), st.integers(1, 3), st.integers(0, 10_000),
    ),
    positions=st.lists(st.integers(-N_POS, N_POS - 1), min_size=1, max_size=4),
    mode=st.sampled_from(["zero", "mask", "scale", "patch", "mean", "resample"]),
    target=st.sampled_from(["weight", "source", "contribution"]),
    metric=st.sampled_from(["loss", "kl"]),
    groups=st.sampled_from(["slice", "family"]),
    budget=st.sampled_from([None, 1, 40]),
)
def test_position_restricted_sweep_equals_one_forward_per_row(config, positions, mode, target, metric, groups, budget):
    flavour, routing_mode, n_layers, n_blocks, seed = config
    model = tiny_attnres(flavour, routing_mode, n_layers, min(n_blocks, n_layers), seed)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 300, (3, N_POS), generator=gen)
    kwargs = dict(mode=mode, positions=positions, metric=metric, groups=groups, progress=False, max_batch_tokens=budget)
    if mode in ("patch", "mean", "resample"):
        kwargs["target"] = target
    if mode == "patch":
        kwargs["reference"] = torch.randint(0, 300, (3, N_POS), generator=gen)
    if mode == "scale":
        kwargs["factor"] = -0.6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rows masking every source of a router (NaN)
        naive = sweep_sources(model, tokens, engine="naive", **kwargs)
        batched, seen = _positions_seen(model, lambda: sweep_sources(model, tokens, engine="batched", **kwargs))
    _assert_same(naive, batched)
    first = min(p % N_POS for p in positions)
    full_runs = 1 + (mode in ("patch", "mean"))  # the clean pass (and the reference run)
    if first > 0:
        assert seen.count(N_POS) == full_runs
        assert set(seen) <= {N_POS, N_POS - first}  # every rerun: positions first .. only
    assert no_hooks_left(model)


def test_last_position_sweep_reruns_one_position(model):
    tokens = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(4))
    naive = sweep_sources(model, tokens, engine="naive", positions=[-1], metric="kl", progress=False)
    batched, seen = _positions_seen(
        model, lambda: sweep_sources(model, tokens, positions=[-1], metric="kl", progress=False)
    )
    _assert_same(naive, batched)
    assert seen == [12, 1]  # the clean pass, then every row in one stack of one position
    assert (batched.effect.abs() > 0).any()


# ---------------------------------------------------------------------------- TL-style patching
@pytest.mark.parametrize("by_pos", [True, False])
@pytest.mark.parametrize("sublayer, target", [("attn", "weight"), ("mlp", "source")])
def test_tl_patching_equals_tl_loop_in_one_batched_pass(model, by_pos, sublayer, target):
    gen = torch.Generator().manual_seed(6)
    clean_tokens, corrupted = torch.randint(0, 300, (2, 5), generator=gen), torch.randint(0, 300, (2, 5), generator=gen)
    _, clean_cache = model.run_with_cache(clean_tokens, names_filter=lambda n: "_router." in n)

    def metric(logits):
        return per_prompt_loss(logits, corrupted).mean()

    what = "weights" if target == "weight" else "sources"
    index_df = routing_index_df(model, sublayer, by_pos, corrupted.shape[1])
    expected = patching.generic_activation_patch(  # TL's own loop on the model: one forward per row
        model, corrupted, clean_cache, metric, routing_patch_setter, f"{sublayer}_router_{what}", index_df=index_df
    )
    embeds = []
    with model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: embeds.append(1))]):
        values = get_act_patch_routing(model, corrupted, clean_cache, metric, sublayer, by_pos, target=target)
    assert len(embeds) == 1  # one clean pass; every row reran from the clean prefix
    assert values.shape == expected.shape == (len(index_df),)
    np.testing.assert_allclose(values.numpy(), expected.numpy(), atol=1e-5, rtol=0)
    assert no_hooks_left(model)


@pytest.mark.skipif(not PATCHING_HAS_REDUCE, reason="reduce=/baseline= need TransformerLens 4")
def test_tl_patching_by_pos_keeps_tl_results(kimi):
    gen = torch.Generator().manual_seed(7)
    clean_tokens, corrupted = torch.randint(0, 300, (3, 4), generator=gen), torch.randint(0, 300, (3, 4), generator=gen)
    _, clean_cache = kimi.run_with_cache(clean_tokens, names_filter=lambda n: "_router." in n)
    metric = lambda logits: per_prompt_loss(logits, corrupted)  # noqa: E731
    index_df = routing_index_df(kimi, "attn", True, 4)
    expected = patching.generic_activation_patch(
        kimi, corrupted, clean_cache, metric, routing_patch_setter, "attn_router_weights", index_df=index_df,
        reduce="none", baseline=True,
    )
    result = get_act_patch_routing(kimi, corrupted, clean_cache, metric, by_pos=True, reduce="none", baseline=True)
    assert tuple(result.values.shape) == (len(index_df), 3)
    np.testing.assert_allclose(result.values.numpy(), expected.values.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(result.effect().numpy(), expected.effect().numpy(), atol=1e-5, rtol=0)


def test_tl_patching_from_a_longer_clean_run_is_tl_loop(kimi):
    """A clean cache of another length is patched position by position, as TL's loop does."""
    gen = torch.Generator().manual_seed(8)
    clean_tokens, corrupted = torch.randint(0, 300, (2, 6), generator=gen), torch.randint(0, 300, (2, 4), generator=gen)
    _, clean_cache = kimi.run_with_cache(clean_tokens, names_filter=lambda n: "_router." in n)
    metric = lambda logits: per_prompt_loss(logits, corrupted).mean()  # noqa: E731
    expected = patching.generic_activation_patch(
        kimi, corrupted, clean_cache, metric, routing_patch_setter, "mlp_router_weights",
        index_df=routing_index_df(kimi, "mlp", True, 4),
    )
    values = get_act_patch_routing(kimi, corrupted, clean_cache, metric, "mlp", by_pos=True)
    np.testing.assert_allclose(values.numpy(), expected.numpy(), atol=0, rtol=0)
