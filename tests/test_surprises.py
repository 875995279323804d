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


# ----------------------------------------------------------------------------- padding (Q 5)
PROMPTS = ["ab", "abcdef", "xyz", "hello world"]  # unequal lengths: a batch of them is padded


def test_loss_per_token_leaves_pads_out_as_tl_does(kimi):
    """``model(["ab", "abcdef"], loss_per_token=True)``: each real target's loss is the one the
    prompt has alone; a pad target's is 0 (TransformerLens' ``lm_cross_entropy_loss``), and the
    mean counts real targets only."""
    tokens, mask = kimi.to_tokens(PROMPTS, return_attention_mask=True)
    assert mask.sum(1).tolist() == [len(p) for p in PROMPTS]  # the mask travels with the tokens
    per_token = kimi(PROMPTS, return_type="loss", loss_per_token=True)
    alone = [kimi(p, return_type="loss", loss_per_token=True)[0] for p in PROMPTS]
    for row, (prompt, own) in enumerate(zip(PROMPTS, alone)):
        n = len(prompt) - 1
        torch.testing.assert_close(per_token[row, :n], own, atol=1e-5, rtol=1e-5)
        assert (per_token[row, n:] == 0).all()  # pad targets
    mean = kimi(PROMPTS, return_type="loss")
    expected = torch.cat(alone).mean()
    torch.testing.assert_close(mean, expected, atol=1e-5, rtol=1e-5)


def test_a_padded_cache_holds_the_unpadded_runs_at_real_positions(kimi):
    _, cache = kimi.run_with_cache(PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        _, own = kimi.run_with_cache(prompt)
        for name in ("blocks.1.hook_attn_out", "blocks.1.attn_router.hook_weights", "ln_final.hook_normalized"):
            torch.testing.assert_close(cache[name][row, : len(prompt)], own[name][0], atol=1e-5, rtol=1e-5)


def test_analysis_of_unequal_strings_equals_the_prompts_run_one_by_one(kimi):
    """Routing statistics, gradients, mass_vs_effect (its sweep and routing mass) and the
    estimators take a list of strings without padding it (prompts of one length are batched
    together): their numbers equal those of the prompts given one by one, as token tensors."""
    import warnings

    from attnres_lens import gradient_attribution, mass_vs_effect, routing_statistics
    from attnres_lens.attribution.estimate import estimate_effects

    one_by_one = [kimi.to_tokens(p) for p in PROMPTS]
    stats, own_stats = routing_statistics(kimi, PROMPTS), routing_statistics(kimi, one_by_one)
    assert stats.n_tokens == sum(len(p) for p in PROMPTS)
    pd.testing.assert_frame_equal(stats.slices, own_stats.slices, atol=1e-6, rtol=1e-5)
    grads, own_grads = gradient_attribution(kimi, PROMPTS), gradient_attribution(kimi, one_by_one)
    pd.testing.assert_frame_equal(grads, own_grads, atol=1e-6, rtol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = mass_vs_effect(kimi, PROMPTS, n_boot=40)
        own_report = mass_vs_effect(kimi, one_by_one, n_boot=40)
    for column in ("mass", "effect"):
        np.testing.assert_allclose(report.table[column], own_report.table[column], atol=1e-6, rtol=1e-5)
    estimates, own_estimates = estimate_effects(kimi, PROMPTS), estimate_effects(kimi, one_by_one)
    pd.testing.assert_frame_equal(estimates, own_estimates, atol=1e-6, rtol=1e-4)


def test_a_config_field_of_the_wrong_type_names_the_field_and_the_file(tmp_path, capsys):
    import json
    import shutil

    from attnres_lens import HookedAttnResTransformer, bundled
    from attnres_lens.cli import main
    from attnres_lens.loading import CheckpointError

    ckpt = tmp_path / "four"
    shutil.copytree(bundled.model_path(bundled.ATTNRES_MODEL), ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "num_hidden_layers": "four"}))
    expected = f"{ckpt / 'config.json'}: num_hidden_layers must be an integer, got 'four'"
    with pytest.raises(CheckpointError) as err:
        HookedAttnResTransformer.from_pretrained(ckpt)
    assert str(err.value) == expected
    assert main(["inspect", str(ckpt)]) == 1
    assert capsys.readouterr().err.strip() == f"attnres-lens inspect: error: {expected}"
