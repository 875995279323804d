"""Issue 25 (Q): messages that say what is wrong, and padded batches whose pads no consumer
counts. Each test states what a user would otherwise be surprised by."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from attnres_lens.attribution.mass_effect import gradient_agreement


# ----------------------------------------------------------------------------- messages (Q 6)
def test_an_empty_string_in_a_batch_is_named(kimi):
    with pytest.raises(ValueError, match=r"input\[1\] \(''\) tokenises to zero tokens; every prompt needs"):
        kimi.to_tokens(["abc", "", "de"])
    with pytest.raises(ValueError, match=r"input\[0\] \(''\) and 1 more tokenises to zero tokens"):
        kimi.to_tokens(["", "", "de"])
    with pytest.raises(ValueError, match=r"the string '' tokenises to zero tokens"):
        kimi("")


def test_an_unknown_cache_key_suggests_close_names(kimi):
    _, cache = kimi.run_with_cache(torch.tensor([[1, 2, 3]]))
    with pytest.raises(KeyError, match=r"blocks.0.hook_atn_out is not in the cache; did you mean 'blocks.0.hook_attn_out'"):
        cache["blocks.0.hook_atn_out"]
    with pytest.raises(KeyError, match=r"is not in the cache; its keys are listed by cache.keys\(\)"):
        cache["zzzzzzzz"]
    assert cache["blocks.0.hook_attn_out"].shape[:2] == (1, 3)  # a right key still reads


def test_a_negligible_gradient_estimate_is_not_a_sign_disagreement():
    """-0.0000 against a significant effect: the estimate missed the effect; it has no sign."""
    table = pd.DataFrame({
        "name": ["a", "b", "c", "d"],
        "mass": [0.4, 0.3, 0.2, 0.1],
        "effect": [0.5, 0.2, 0.3, 0.001],
        "effect_low": [0.4, 0.1, 0.2, -0.01],
        "effect_high": [0.6, 0.3, 0.4, 0.01],
        "effect_ci_excludes_zero": [True, True, True, False],
        "grad_estimate": [0.45, -0.00001, -0.25, 0.001],
    })
    agreement = gradient_agreement(table, np.ones(4, dtype=bool), effect_threshold=0.01, top_k=2, kind="zero")
    why = dict(zip(agreement["disagreements"]["name"], agreement["disagreements"]["why"]))
    assert why == {"b": "estimate ~0 (under the effect threshold)", "c": "sign differs"}


# ----------------------------------------------------------------------------- threads (Q 8)
def test_the_library_sets_no_global_threads(tmp_path):
    """Loading, a forward, routing statistics and mass_vs_effect leave torch's thread count as
    the user set it (the suite's own 1 is set back afterwards)."""
    import warnings

    from attnres_lens import HookedAttnResTransformer, bundled, mass_vs_effect, routing_statistics

    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        model = HookedAttnResTransformer.from_pretrained(bundled.model_path(bundled.ATTNRES_MODEL))
        tokens = bundled.eval_tokens(model, n_prompts=4, seq_len=16)
        model(tokens)
        routing_statistics(model, tokens)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mass_vs_effect(model, tokens, n_boot=40, groups="family")
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- structural rows (Q 2)
def test_a_row_whose_mass_is_fixed_by_construction_is_structural(report, cumulative):
    """One layer per block: layer 0's attention reads the embedding twice (emb = stream), so its
    merged row has mass 1 whatever the input. It is marked, said why, and compared with nothing."""
    import scipy.stats

    from attnres_lens.attribution.mass_effect import STRUCTURAL_ONE_TENSOR

    t = report.table
    structural = t[t["structural"]]
    assert list(structural["name"]) == ["L0 attn: [0] emb = stream"]
    assert structural["mass"].tolist() == pytest.approx([1.0])
    assert structural["structural_reason"].tolist() == [STRUCTURAL_ONE_TENSOR]
    assert (t["eligible"] == ~t["structural"]).all()
    rest = t[~t["structural"]]
    assert report.rank_correlation["n"] == len(rest)
    assert report.rank_correlation["spearman"]["estimate"] == pytest.approx(
        scipy.stats.spearmanr(rest["mass"], rest["abs_effect"]).statistic
    )
    assert "L0 attn: [0] emb = stream" not in set(report.flags["name"])
    assert report.largest["attn"]["largest_mass"] != "L0 attn: [0] emb = stream"
    text = report.to_markdown()
    assert "**Structural rows**" in text and f"- L0 attn: [0] emb = stream: mass 1.0000" in text
    assert STRUCTURAL_ONE_TENSOR in text and "| structural |" in text.replace("  ", " ")


def test_unmerged_copies_are_structural_and_merged_streams_are_named_in_family_bands(cumulative):
    import warnings

    from attnres_lens import mass_vs_effect
    from attnres_lens.attribution.mass_effect import STRUCTURAL_COPY

    tokens = torch.randint(1, 250, (8, 8), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copies = mass_vs_effect(cumulative, tokens, n_boot=40, merge_duplicates=False)
        bands = mass_vs_effect(cumulative, tokens, n_boot=40, groups="family_band")
    t = copies.table
    structural = t[t["structural"]]
    assert list(structural["router"]) == ["blocks.0.attn_router"] * 2
    assert structural["mass"].sum() == pytest.approx(1.0)  # identical keys: a split fixed by the bias alone
    np.testing.assert_allclose(structural["mass_low"], structural["mass_high"], atol=1e-6)  # the same on every prompt
    assert set(structural["structural_reason"]) == {STRUCTURAL_COPY}
    names = list(bands.table["name"])
    assert "history (+ current copies), attn, late (layers 2)" in names, names
    assert not any(n.startswith("history (+") and ", mlp," in n for n in names)  # no copies at mlp routers
