"""The fast effect estimator and the screen (issue H 2)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from reference import tiny_attnres

from attnres_lens.attribution import estimate_effects, mass_vs_effect
from attnres_lens.patching import sweep_sources

pytestmark = pytest.mark.filterwarnings("ignore:bootstrap CIs over only")

MODELS = {
    "cumulative-block": dict(flavour="cumulative", routing_mode="block", n_layers=3, n_blocks=3),
    "kimi-block": dict(flavour="kimi", routing_mode="block", n_layers=3, n_blocks=2),
}


def _model(name: str, seed: int = 0):
    kw = dict(MODELS[name])
    return tiny_attnres(kw.pop("flavour"), kw.pop("routing_mode"), seed=seed, routers="queries", query_scale=0.5,
                        n_heads=4, d_mlp=64, d_vocab=64, n_ctx=64, initializer_range=0.2, **kw)


def _tokens(n: int = 6, pos: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(64, (n, pos), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("mode", ["zero", "mask"])
def test_readout_is_exact_where_nothing_follows_but_the_readout(name, mode):
    """At the last sublayer's router (and kimi's final router) the only path to the metric is
    the direct one, which the readout method computes exactly: estimate == exact effect."""
    model, tokens = _model(name), _tokens()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact = sweep_sources(model, tokens, mode=mode, progress=False)
    est = estimate_effects(model, tokens, mode=mode)
    assert list(est[["router", "source"]].itertuples(index=False)) == list(exact[["router", "source"]].itertuples(index=False))
    last = {f"blocks.{model.cfg.n_layers - 1}.mlp_router", "final_router"}
    rows = est.router.isin(last).to_numpy() & np.isfinite(exact.effect.to_numpy())
    assert rows.sum() >= 3
    for i in np.flatnonzero(rows):
        np.testing.assert_allclose(est.estimate_per_prompt.iloc[i], exact.effect_per_prompt.iloc[i], atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(est.mass.to_numpy(), exact.mass.to_numpy(), atol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_method_is_the_derivative_for_a_small_scale(name):
    """For ``scale`` with a factor near 1 every method is first-order exact."""
    model, tokens = _model(name, seed=1), _tokens(seed=1)
    eps = 1e-2
    exact = sweep_sources(model, tokens, mode="scale", factor=1 - eps, progress=False).effect.to_numpy()
    big = np.abs(exact) > 1e-4
    assert big.sum() >= 5
    for method in ("gradient", "norm_fix", "readout"):
        est = estimate_effects(model, tokens, mode="scale", factor=1 - eps, method=method).estimate.to_numpy()
        np.testing.assert_allclose(est[big], exact[big], rtol=0.08, atol=2e-5, err_msg=method)


def test_merged_duplicates_and_groups_follow_the_sweep():
    model, tokens = _model("cumulative-block"), _tokens()
    for groups in ("slice", "family", "family_band"):
        est = estimate_effects(model, tokens, groups=groups)
        exact = sweep_sources(model, tokens, groups=groups, progress=False)
        assert list(est.label) == list(exact.label)
    est = estimate_effects(model, tokens, merge_duplicates=False)
    assert len(est) == len(model.source_table())


def test_refusals():
    model, tokens = _model("kimi-block"), _tokens()
    with pytest.raises(ValueError, match="unknown method"):
        estimate_effects(model, tokens, method="magic")
    with pytest.raises(ValueError, match="supports modes"):
        estimate_effects(model, tokens, mode="patch")
    with pytest.raises(ValueError, match="kl"):
        estimate_effects(model, tokens, metric="kl")
    with pytest.raises(ValueError, match="factor"):
        estimate_effects(model, tokens, mode="scale")


@pytest.mark.parametrize("name", list(MODELS))
def test_screen_measures_the_top_rows_and_a_control_subset_exactly(name):
    model, tokens = _model(name), _tokens(8)
    full = mass_vs_effect(model, tokens, gradient=False, n_boot=50)
    screened = mass_vs_effect(model, tokens, gradient=False, n_boot=50, engine="screen", screen_k=4, screen_control=3)
    info = screened.settings["screen"]
    assert info["k"] == 4 and info["n_control"] == 3 and info["n_exact"] == 7
    table = screened.table.set_index("name")
    exact = full.table.set_index("name")
    measured = table[table.exact]
    assert len(measured) == 7
    np.testing.assert_allclose(measured.effect, exact.loc[measured.index, "effect"], atol=1e-6)
    est = estimate_effects(model, tokens)
    by_estimate = est.assign(abs_estimate=est.estimate.abs()).sort_values("abs_estimate", ascending=False)
    assert set(table.index[table.exact]) >= {n for n in table.index if table.loc[n, "estimate"] in set(by_estimate.estimate[:4])}
    unmeasured = table[~table.exact]
    np.testing.assert_allclose(unmeasured.effect, unmeasured.estimate, atol=1e-9)
    # misses: control rows whose exact |effect| beats the smallest measured top-k |effect|
    top = table[table.exact & table.estimate.abs().isin(by_estimate.estimate.abs()[:4])]
    controls = measured.drop(top.index)
    expected = {n for n in controls.index if abs(controls.loc[n, "effect"]) > top.effect.abs().min()}
    assert set(info["misses"]) == expected and info["n_misses"] == len(expected)
    assert 0 < info["miss_rate_upper95"] <= 1 and info["missed_bound"] == pytest.approx(info["miss_rate_upper95"] * info["n_unmeasured"])
    # measuring everything is the exact report
    everything = mass_vs_effect(model, tokens, gradient=False, n_boot=50, engine="screen", screen_k=100)
    np.testing.assert_allclose(everything.table.effect, full.table.effect, atol=1e-6)
    only_estimate = mass_vs_effect(model, tokens, gradient=False, n_boot=50, engine="estimate")
    assert not only_estimate.table.exact.any() and "estimate" in only_estimate.to_markdown()


def test_mass_vs_effect_names_its_engines():
    model, tokens = _model("kimi-block"), _tokens()
    with pytest.raises(ValueError, match="screen"):
        mass_vs_effect(model, tokens, engine="fast")


@pytest.mark.parametrize("name", list(MODELS))
def test_the_screens_exact_part_starts_from_the_estimates_clean_run(name):
    """The estimate's forward is the exact engine's clean run: measuring rows from it, or from
    a fresh clean pass (nothing kept), gives the sweep's effects, minibatch by minibatch."""
    from attnres_lens.attribution.estimate import estimate_keeping_clean_runs
    from attnres_lens.attribution.screen import exact_rows
    from attnres_lens.metrics import Metric

    model, tokens = _model(name), _tokens(6)
    exact = sweep_sources(model, tokens, mode="zero", progress=False, batch_size=4)
    kwargs = dict(mode="zero", metric=Metric.resolve("loss"), groups="slice", positions=None, batch_size=4,
                  merge_duplicates=True, bands=None)
    for keep_bytes, kept in ((1 << 30, True), (0, False)):
        table, chunks = estimate_keeping_clean_runs(model, tokens, keep_bytes=keep_bytes, **kwargs)
        assert [c.rows for c in chunks] == [slice(0, 4), slice(4, 6)]
        assert all((c.clean is not None) == kept for c in chunks)
        rows = [0, 3, len(table) - 1]
        effect = np.full((len(table), 6), np.nan)
        clean = exact_rows(model, chunks, table.attrs["units"], rows, "zero", Metric.resolve("loss"), None, effect)
        np.testing.assert_allclose(clean, exact.attrs["metric_clean_per_prompt"], atol=1e-6)
        for i in rows:
            np.testing.assert_allclose(effect[i], exact.effect_per_prompt.iloc[i], atol=1e-6)
        assert np.isnan(effect[1]).all()
