"""Sweeps over depth-source slices: the batched engine equals the naive one, the TL-style
patching function agrees with sweep_sources, and the table keeps its contract."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference import no_hooks_left, tiny_attnres

from attnres_lens.compat import PATCHING_HAS_REDUCE
from attnres_lens.interventions import Group
from attnres_lens.patching import (
    SWEEP_COLUMNS,
    default_bands,
    get_act_patch_routing,
    logit_diff_metric,
    per_prompt_loss,
    routing_index_df,
    sweep_sources,
)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 300, (4, 6), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def other_tokens():
    return torch.randint(0, 300, (4, 6), generator=torch.Generator().manual_seed(2))


def assert_same(a: pd.DataFrame, b: pd.DataFrame, atol=1e-5):
    assert list(a.columns) == list(b.columns) == list(SWEEP_COLUMNS)
    pd.testing.assert_frame_equal(a[list(SWEEP_COLUMNS[:6])], b[list(SWEEP_COLUMNS[:6])])
    np.testing.assert_allclose(np.stack(a.effect_per_prompt), np.stack(b.effect_per_prompt), atol=atol, rtol=0)
    np.testing.assert_allclose(np.stack(a.mass_per_prompt), np.stack(b.mass_per_prompt), atol=1e-7, rtol=0)
    np.testing.assert_allclose(a.metric_ablated, b.metric_ablated, atol=atol, rtol=0)


# ---------------------------------------------------------------------------- batched == naive
CASES = [
    dict(mode="zero"),
    dict(mode="mask", groups="family"),
    dict(mode="scale", factor=0.5, groups="family_band", metric="kl"),
    dict(mode="patch", target="contribution", positions=[2, 5]),
    dict(mode="mean", target="source", batch_size=3),
    dict(mode="resample", target="weight", max_batch_tokens=30),
]


@pytest.mark.parametrize("kwargs", CASES, ids=[c["mode"] for c in CASES])
def test_batched_equals_naive(model, tokens, other_tokens, kwargs):
    kwargs = dict(kwargs)
    if kwargs["mode"] == "patch":
        kwargs["reference"] = other_tokens
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rows masking every source of a router (NaN)
        naive = sweep_sources(model, tokens, engine="naive", progress=False, **kwargs)
        batched = sweep_sources(model, tokens, engine="batched", progress=False, **kwargs)
    assert_same(naive, batched)
    assert no_hooks_left(model)


configs = st.tuples(
    st.sampled_from(["kimi", "cumulative"]),
    st.sampled_from(["block", "full"]),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(0, 10_000),
)


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    config=configs,
    mode=st.sampled_from(["zero", "mask", "scale", "patch", "mean", "resample"]),
    target=st.sampled_from(["weight", "source", "contribution"]),
    budget=st.sampled_from([None, 1, 25]),
)
def test_batched_equals_naive_random(config, mode, target, budget):
    flavour, routing_mode, n_layers, n_blocks, seed = config
    model = tiny_attnres(flavour, routing_mode, n_layers, min(n_blocks, n_layers), seed)
    gen = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, 300, (2, 5), generator=gen)
    kwargs = dict(mode=mode, progress=False, max_batch_tokens=budget, metric="loss")
    if mode in ("patch", "mean", "resample"):
        kwargs["target"] = target
    if mode == "patch":
        kwargs["reference"] = torch.randint(0, 300, (2, 5), generator=gen)
    if mode == "scale":
        kwargs["factor"] = 1.7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        naive = sweep_sources(model, toks, engine="naive", **kwargs)
        batched = sweep_sources(model, toks, engine="batched", **kwargs)
    assert_same(naive, batched)
    # slice masses of one router sum to 1 (per prompt)
    for _, rows in batched.groupby("router"):
        np.testing.assert_allclose(np.stack(rows.mass_per_prompt).sum(0), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------- TL-style patching
@pytest.mark.parametrize("sublayer", ["attn", "mlp"])
@pytest.mark.parametrize("target", ["weight", "source"])
def test_tl_patching_matches_sweep(model, tokens, other_tokens, sublayer, target):
    _, clean_cache = model.run_with_cache(other_tokens, names_filter=lambda n: "_router." in n)

    def metric(logits):
        return per_prompt_loss(logits, tokens).mean()

    values, index_df = get_act_patch_routing(
        model, tokens, clean_cache, metric, sublayer=sublayer, target=target, return_index_df=True
    )
    assert list(index_df.columns) == ["layer", "source"]
    assert len(values) == len(index_df) == sum(s.n_sources for s in model.router_specs if s.sublayer == sublayer)
    df = sweep_sources(
        model, tokens, mode="patch", reference=clean_cache, target=target, progress=False,
        routers=[s.name for s in model.router_specs if s.sublayer == sublayer], merge_duplicates=False,
    )
    ours = df.set_index(["layer", "source"]).loc[list(index_df.itertuples(index=False, name=None))]
    np.testing.assert_allclose(values.numpy(), ours.metric_ablated.to_numpy(), atol=1e-5, rtol=0)
    assert no_hooks_left(model)


def test_tl_patching_by_pos_matches_sweep_at_one_position(kimi, tokens, other_tokens):
    _, clean_cache = kimi.run_with_cache(other_tokens, names_filter=lambda n: "_router." in n)
    values, index_df = get_act_patch_routing(
        kimi, tokens, clean_cache, lambda lg: per_prompt_loss(lg, tokens).mean(), sublayer="mlp",
        by_pos=True, return_index_df=True,
    )
    assert list(index_df.columns) == ["layer", "source", "pos"]
    assert len(index_df) == len(routing_index_df(kimi, "mlp")) * tokens.shape[1]
    df = sweep_sources(
        kimi, tokens, mode="patch", reference=clean_cache, positions=[3], progress=False,
        routers=[s.name for s in kimi.router_specs if s.sublayer == "mlp"],
    )
    at3 = index_df["pos"] == 3
    ours = df.set_index(["layer", "source"]).loc[list(index_df[at3][["layer", "source"]].itertuples(index=False, name=None))]
    np.testing.assert_allclose(values[torch.tensor(at3.to_numpy())].numpy(), ours.metric_ablated.to_numpy(), atol=1e-5)


def test_tl_reduce_and_baseline(kimi, tokens, other_tokens):
    _, clean_cache = kimi.run_with_cache(other_tokens, names_filter=lambda n: "_router." in n)
    per_prompt = lambda logits: per_prompt_loss(logits, tokens)  # noqa: E731
    if not PATCHING_HAS_REDUCE:
        with pytest.raises(TypeError, match="TransformerLens >= 4"):
            get_act_patch_routing(kimi, tokens, clean_cache, per_prompt, reduce="none")
        return
    result = get_act_patch_routing(kimi, tokens, clean_cache, per_prompt, sublayer="attn", reduce="none", baseline=True)
    df = sweep_sources(
        kimi, tokens, mode="patch", reference=clean_cache, progress=False,
        routers=[s.name for s in kimi.router_specs if s.sublayer == "attn"],
    )
    assert tuple(result.values.shape) == (len(df), tokens.shape[0])
    np.testing.assert_allclose(result.effect().numpy(), np.stack(df.effect_per_prompt), atol=1e-5)


def test_tl_patching_refusals(kimi, tokens):
    _, cache = kimi.run_with_cache(tokens, names_filter=["blocks.0.hook_attn_router_weights"])
    metric = lambda logits: logits.sum()  # noqa: E731
    with pytest.raises(KeyError, match=r"blocks\.1\.hook_attn_router_weights"):
        get_act_patch_routing(kimi, tokens, cache, metric)
    with pytest.raises(ValueError, match="sublayer must be 'attn' or 'mlp'"):
        get_act_patch_routing(kimi, tokens, cache, metric, sublayer="final")
    with pytest.raises(ValueError, match="contribution"):
        get_act_patch_routing(kimi, tokens, cache, metric, target="contribution")
    with pytest.raises(TypeError, match="unexpected keyword"):
        get_act_patch_routing(kimi, tokens, cache, metric, colour="red")


# ---------------------------------------------------------------------------- the table
def test_table_contract(model, tokens):
    df = sweep_sources(model, tokens, progress=False)
    assert list(df.columns) == list(SWEEP_COLUMNS)
    table = model.source_table()
    firsts = table[table.duplicate_of.isna()].reset_index(drop=True)  # copies merge into their first holder
    keys = ["router", "layer", "sublayer", "source", "family", "n_copies"]
    pd.testing.assert_frame_equal(df[keys], firsts[keys], check_dtype=False)  # source: Int64 (NA for groups)
    single = (firsts.n_copies == 1).to_numpy()
    assert list(df.label[single]) == list(firsts.label[single])
    for row in df.itertuples():
        assert isinstance(row.effect_per_prompt, np.ndarray) and row.effect_per_prompt.shape == (4,)
        assert isinstance(row.mass_per_prompt, np.ndarray) and row.mass_per_prompt.shape == (4,)
        assert row.effect == pytest.approx(row.effect_per_prompt.mean())
        assert row.metric_ablated - row.metric_clean == pytest.approx(row.effect, abs=1e-9)
    clean = df.attrs["metric_clean_per_prompt"]
    with torch.no_grad():
        loss = model(tokens, return_type="loss", loss_per_token=True).mean(-1)
    np.testing.assert_allclose(clean, loss.numpy(), rtol=1e-6)
    assert df.metric_clean.iloc[0] == pytest.approx(clean.mean())


def test_family_and_band_masses(model, tokens):
    slices = sweep_sources(model, tokens, progress=False, metric="kl")
    fams = sweep_sources(model, tokens, groups="family", progress=False, metric="kl")
    assert fams.source.isna().all()
    for row in fams.itertuples():
        members = slices[(slices.router == row.router) & (slices.family == row.family)]
        np.testing.assert_allclose(row.mass_per_prompt, np.stack(members.mass_per_prompt).sum(0), atol=1e-6)
        assert row.label.startswith(f"{row.family}: ")
    bands = sweep_sources(model, tokens, groups="family_band", progress=False, metric="kl")
    assert bands.router.isna().all() and bands.layer.isna().all()
    assert set(bands.sublayer) <= {"attn", "mlp", "final"}
    n_layers = model.cfg.n_layers
    row = bands[(bands.family == "embedding") & (bands.sublayer == "mlp") & bands.label.str.contains("late")].iloc[0]
    late = list(default_bands(n_layers)["late"])
    per_router = fams[(fams.family == "embedding") & (fams.sublayer == "mlp") & fams.layer.isin(late)]
    np.testing.assert_allclose(row.mass_per_prompt, np.stack(per_router.mass_per_prompt).mean(0), atol=1e-6)
    custom = sweep_sources(
        model, tokens, groups="family_band", bands={"first": [0], "rest": range(1, n_layers)}, progress=False
    )
    assert custom.label.str.contains("first").any() and custom.label.str.contains("rest").any()
    mapping = sweep_sources(
        model, tokens, groups={"two": [("blocks.1.mlp_router", 0), ("blocks.2.mlp_router", 0)]}, progress=False
    )
    assert mapping.label.tolist() == ["two"] and mapping.router.isna().all() and mapping.family.iloc[0] == "embedding"
    assert mapping.sublayer.iloc[0] == "mlp"


def test_metrics(kimi, tokens):
    kl = sweep_sources(kimi, tokens, metric="kl", progress=False)
    assert (kl.metric_clean.abs() < 1e-6).all() and (np.stack(kl.effect_per_prompt) > -1e-6).all()
    ld = logit_diff_metric(torch.tensor([1, 2, 3, 4]), 5, position=-1)
    df = sweep_sources(kimi, tokens, metric=ld, progress=False)
    df2 = sweep_sources(kimi, tokens, metric=ld, progress=False, batch_size=3)  # subset() per minibatch
    np.testing.assert_allclose(np.stack(df.effect_per_prompt), np.stack(df2.effect_per_prompt), atol=1e-5)
    # mass is read where the metric reads: the last position only
    _, cache = kimi.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_weights"))
    w = cache["blocks.3.mlp_router.hook_weights"][:, -1, 1]
    row = df[(df.router == "blocks.3.mlp_router") & (df.source == 1)].iloc[0]
    np.testing.assert_allclose(row.mass_per_prompt, w.numpy(), atol=1e-6)
    custom = sweep_sources(kimi, tokens, metric=lambda logits, toks: logits[:, -1, 0], progress=False)
    assert len(custom) == len(df)
    with pytest.raises(ValueError, match=r"must return a \[batch\] tensor"):
        sweep_sources(kimi, tokens, metric=lambda logits, toks: logits.sum(), progress=False)
    with pytest.raises(ValueError, match="unknown metric"):
        sweep_sources(kimi, tokens, metric="accuracy", progress=False)


@pytest.mark.parametrize("engine", ["naive", "batched"])
def test_hooks_removed_after_metric_raises(kimi, tokens, engine):
    calls = []

    def bad(logits, toks):
        calls.append(1)
        if len(calls) > 1:  # the clean run passes, the first intervened run fails
            raise RuntimeError("metric failed")
        return logits[:, -1, 0]

    with pytest.raises(RuntimeError, match="metric failed"):
        sweep_sources(kimi, tokens, metric=bad, engine=engine, progress=False)
    assert no_hooks_left(kimi)
    with torch.no_grad():
        assert torch.equal(kimi(tokens), kimi(tokens))


def test_undefined_mask_rows_are_nan(kimi, tokens):
    with pytest.warns(UserWarning, match="mask every source"):
        df = sweep_sources(kimi, tokens, mode="mask", progress=False)
    bad = df[df.router == "blocks.0.attn_router"]  # kimi layer 0 attention reads the embedding alone
    assert len(bad) == 1 and np.isnan(bad.effect.iloc[0]) and not np.isnan(bad.mass.iloc[0])
    assert df[df.router != "blocks.0.attn_router"].effect.notna().all()


def test_minibatches_do_not_change_results(kimi, tokens, other_tokens):
    full = sweep_sources(kimi, tokens, mode="patch", reference=other_tokens, target="source", progress=False)
    mb = sweep_sources(kimi, tokens, mode="patch", reference=other_tokens, target="source", progress=False, batch_size=1)
    assert_same(full, mb)


def test_sweep_refusals(kimi, tokens):
    with pytest.raises(ValueError, match="unknown mode"):
        sweep_sources(kimi, tokens, mode="erase", progress=False)
    with pytest.raises(ValueError, match="unknown engine"):
        sweep_sources(kimi, tokens, engine="fast", progress=False)
    with pytest.raises(ValueError, match="needs factor"):
        sweep_sources(kimi, tokens, mode="scale", progress=False)
    with pytest.raises(ValueError, match="needs reference"):
        sweep_sources(kimi, tokens, mode="patch", progress=False)
    with pytest.raises(ValueError, match="unknown target"):
        sweep_sources(kimi, tokens, mode="mean", target="key", progress=False)
    with pytest.raises(ValueError, match="unknown groups"):
        sweep_sources(kimi, tokens, groups="layer", progress=False)
    with pytest.raises(IndexError, match="positions 9 out of range"):
        sweep_sources(kimi, tokens, positions=[9], progress=False)
    with pytest.raises(ValueError, match="bands= only applies"):
        sweep_sources(kimi, tokens, bands={"a": [0]}, progress=False)
    with pytest.raises(IndexError, match="layer 7 out of range"):
        sweep_sources(kimi, tokens, groups="family_band", bands={"a": [7]}, progress=False)
    with pytest.raises(ValueError, match="at least 2 prompts"):
        sweep_sources(kimi, tokens, mode="resample", batch_size=3, progress=False)
    with pytest.raises(ValueError, match="shape"):
        sweep_sources(kimi, tokens, mode="patch", reference=tokens[:2], progress=False)
    with pytest.raises(KeyError, match="unknown routers"):
        sweep_sources(kimi, tokens, routers=["blocks.0.ffn_router"], progress=False)
    assert no_hooks_left(kimi)


def test_group_spanning_routers_matches_naive(kimi, tokens):
    groups = {
        "emb everywhere": [(s.name, 0) for s in kimi.router_specs],
        "late history": [("blocks.3.attn_router", 1), ("final_router", 1)],
    }
    naive = sweep_sources(kimi, tokens, mode="zero", groups=groups, engine="naive", progress=False)
    batched = sweep_sources(kimi, tokens, mode="zero", groups=groups, engine="batched", progress=False)
    assert_same(naive, batched)
    assert Group(slices=groups["late history"], label="x").label == "x"


def test_a_metric_that_is_not_finite_is_named_by_sweeps_and_gradients(kimi):
    """Issue K 4: a NaN metric is said, with the prompts, not returned as quiet NaN effects."""
    import warnings

    from attnres_lens.attribution import gradient_attribution
    from attnres_lens.patching import NonFiniteMetricWarning

    tokens = torch.randint(0, kimi.cfg.d_vocab, (3, 6))

    def nan_on_prompt_1(logits, tokens):
        values = logits[:, -1].float().logsumexp(-1)
        return torch.where(torch.arange(len(values)) == 1, torch.full_like(values, float("nan")), values)

    with pytest.warns(NonFiniteMetricWarning, match=r"not finite on the clean run \(prompt\(s\) \[1\]\)"):
        table = sweep_sources(kimi, tokens, metric=nan_on_prompt_1, mode="zero")
    assert np.isnan(np.stack(table["effect_per_prompt"])[:, 1]).all()
    with pytest.raises(ValueError, match=r"not finite on the clean run \(prompt\(s\) \[1\]\)"):
        gradient_attribution(kimi, tokens, metric=nan_on_prompt_1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteMetricWarning)  # a finite metric says nothing
        sweep_sources(kimi, tokens, metric=lambda logits, tokens: logits[:, -1].float().logsumexp(-1), mode="zero")
