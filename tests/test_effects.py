"""``Effects`` (issue 19 step 2): one typed result per sweep, one table renderer with fixed
dtypes, plain pandas on it (astype, concat, merge, groupby, parquet, csv), per-prompt data on
the object, joins by unit key, and the same numbers as the legacy sweep table."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from attnres_lens import mass_vs_effect, sweep_sources
from attnres_lens.attribution import gradient_attribution
from attnres_lens.effects import KEY_DTYPES, TABLE_DTYPES, Effects, UnitKey
from attnres_lens.patching import run_sweep

GROUPINGS = ("slice", "family", "family_band")


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(1, 250, (6, 8), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def results(model, tokens):
    """``run_sweep`` of each grouping on the tiny model of each flavour."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {g: run_sweep(model, tokens, groups=g, progress=False) for g in GROUPINGS}


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_table_has_the_fixed_dtypes_and_the_legacy_numbers(results, grouping):
    result = results[grouping]
    effects = result.effects
    table = effects.table()
    assert effects.grouping == grouping and set(table["unit"].str.split(":").str[0]) == {grouping}
    assert {c: str(t) for c, t in table.dtypes.items()} == {c: str(np.dtype(t)) if t in (object, "float64", "bool")
                                                         else t for c, t in TABLE_DTYPES.items()}
    assert table.attrs == {} and not any(isinstance(v, np.ndarray) for v in table.to_numpy().ravel())
    legacy = result.table  # what sweep_sources returns
    assert {c: legacy[c].dtype for c in KEY_DTYPES} == {c: table[c].dtype for c in KEY_DTYPES}
    for column in ("mass", "metric_clean", "metric_ablated", "effect"):
        np.testing.assert_allclose(table[column], legacy[column], rtol=1e-12, atol=1e-12, err_msg=column)
    np.testing.assert_allclose(np.vstack(legacy["effect_per_prompt"]), effects.effect, rtol=0, atol=0)
    np.testing.assert_allclose(legacy.attrs["metric_clean_per_prompt"], effects.clean, rtol=0, atol=0)
    assert len(set(effects.keys)) == len(effects.units), "unit keys are unique"


def test_the_table_survives_plain_pandas(results, tmp_path):
    """The calls that raised on the old tables (pandas compared array-valued .attrs, parquet
    could not serialise them) and the other everyday ones, on every grouping."""
    tables = [results[g].effects.table() for g in GROUPINGS]
    both = pd.concat(tables, ignore_index=True)
    assert len(both) == sum(len(t) for t in tables) and both["layer"].dtype == "Int64"
    as_text = tables[0][["router", "source"]].astype(str)
    assert as_text["source"].iloc[0] == str(tables[0]["source"].iloc[0])
    merged = tables[0].merge(tables[0][["unit", "effect"]], on="unit", suffixes=("", "_again"))
    np.testing.assert_array_equal(merged["effect"], merged["effect_again"])
    by_sublayer = tables[0].groupby("sublayer")["mass"].sum()
    assert set(by_sublayer.index) <= {"attn", "mlp", "final"} and np.isfinite(by_sublayer).all()
    for table in tables:
        table.to_parquet(tmp_path / "t.parquet")
        pd.testing.assert_frame_equal(_typed(pd.read_parquet(tmp_path / "t.parquet")), table)
        table.to_csv(tmp_path / "t.csv", index=False)
        pd.testing.assert_frame_equal(_typed(pd.read_csv(tmp_path / "t.csv")), table)


def _typed(back: pd.DataFrame) -> pd.DataFrame:
    """A table read back from a file, in :data:`TABLE_DTYPES` (files hold NaN or an empty cell
    for ``None``; pandas reads text back as its string dtype)."""
    back = back.astype(TABLE_DTYPES)
    for column, dtype in TABLE_DTYPES.items():
        if dtype is object:
            back[column] = pd.Series([None if pd.isna(v) else v for v in back[column]], dtype=object)
    return back


def test_per_prompt_is_long_format_of_the_same_numbers(results):
    effects = results["slice"].effects
    long = effects.per_prompt()
    assert len(long) == len(effects.units) * effects.n_prompts and long.attrs == {}
    wide = long.pivot(index="unit", columns="prompt", values="effect").loc[[str(k) for k in effects.keys]]
    np.testing.assert_array_equal(wide.to_numpy(), effects.effect)
    means = long.groupby("unit", sort=False)["mass"].mean().loc[effects.table()["unit"]]
    np.testing.assert_allclose(means.to_numpy(), effects.table()["mass"].to_numpy(), rtol=1e-12)


def test_concat_of_batches_equals_one_sweep(model, tokens, results):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        halves = [run_sweep(model, tokens[:3], progress=False).effects, run_sweep(model, tokens[3:], progress=False).effects]
    joined = Effects.concat(halves)
    whole = results["slice"].effects
    assert joined.keys == whole.keys and joined.n_prompts == 6
    np.testing.assert_allclose(joined.effect, whole.effect, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(joined.clean, whole.clean, rtol=1e-6)
    with pytest.raises(ValueError, match="units differ"):
        Effects.concat([halves[0], results["family"].effects])


def test_ranks_records_and_keys(results):
    effects = results["slice"].effects
    ranks = effects.ranks()
    order = np.argsort(-np.abs(effects.mean_effect()), kind="stable")
    assert ranks[order[0]] == 1 and sorted(ranks.tolist()) == sorted(pd.Series(ranks).tolist())
    assert (np.diff(ranks[order]) >= 0).all()
    again = Effects.from_records(effects.units, effects.grouping, effects.records(), effects.settings)
    np.testing.assert_array_equal(again.mass, effects.mass)
    np.testing.assert_array_equal(again.effect, effects.effect)
    assert again.keys == effects.keys and again.undefined == effects.undefined
    key = effects.keys[3]
    assert isinstance(key, UnitKey) and hash(key) == hash(UnitKey(**vars(key)))
    assert effects.index_of(key) == 3
    with pytest.raises(KeyError, match="no unit"):
        effects.index_of(UnitKey("slice", router="nowhere", source=0))
    with pytest.raises(ValueError, match="unknown grouping kind"):
        Effects(units=(), grouping="rows", mass=np.zeros((0, 1)), effect=np.zeros((0, 1)), clean=np.zeros(1))
    with pytest.raises(ValueError, match=r"\[unit, prompt\]"):
        Effects(units=effects.units, grouping="slice", mass=effects.mass[:, :2], effect=effects.effect, clean=effects.clean)


def test_key_dtypes_are_the_same_on_every_path(kimi, tokens, tmp_path):
    """The drift the issue measured: n_copies Int64 normally but int64 with checkpoint_dir and
    object for family rows; source int64 in gradient_attribution."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tables = {
            "slice": sweep_sources(kimi, tokens, progress=False),
            "checkpointed": sweep_sources(kimi, tokens, progress=False, checkpoint_dir=tmp_path / "ck"),
            "family": sweep_sources(kimi, tokens, groups="family", progress=False),
            "family_band": sweep_sources(kimi, tokens, groups="family_band", progress=False),
            "gradient": gradient_attribution(kimi, tokens),
        }
    for name, table in tables.items():
        assert {c: str(table[c].dtype) for c in KEY_DTYPES} == {c: str(pd.Series(dtype=t).dtype) for c, t in KEY_DTYPES.items()}, name
    pd.testing.assert_frame_equal(tables["checkpointed"].drop(columns=["mass_per_prompt", "effect_per_prompt"]),
                                  tables["slice"].drop(columns=["mass_per_prompt", "effect_per_prompt"]), atol=1e-7)


def test_the_report_keeps_its_effects_and_grouping(cumulative):
    tokens = torch.randint(1, 250, (8, 8), generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = mass_vs_effect(cumulative, tokens, groups="family", n_boot=40, gradient=False, engine="screen", screen_k=2)
    assert report.grouping == "family" and len(report.effects.units) == len(report.table)
    np.testing.assert_allclose(report.effects.mean_mass(), report.table["mass"], rtol=1e-12)
    assert report.table["exact"].sum() >= 2 and report.table["exact"].dtype == bool
    np.testing.assert_allclose(report.effects.estimate.mean(axis=1), report.table["estimate"], rtol=1e-12)
    assert report.table.attrs == {}
