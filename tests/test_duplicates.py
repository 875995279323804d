"""Duplicate sources: copies of one tensor at a router are one slice by default (issue H 1)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from reference import tiny_attnres

from attnres_lens import HookedAttnResTransformer, bundled
from attnres_lens.interventions import resample_indices
from attnres_lens.metrics import per_prompt_loss
from attnres_lens.patching import sweep_sources

CONFIGS = [
    ("cumulative", "block", 3, 3),
    ("cumulative", "block", 4, 2),
    ("cumulative", "full", 2, None),
    ("kimi", "block", 3, 2),
    ("kimi", "full", 2, None),
]


@pytest.mark.parametrize("flavour,routing_mode,n_layers,n_blocks", CONFIGS)
def test_duplicate_of_from_the_layout_is_tensor_identity_in_the_forward(flavour, routing_mode, n_layers, n_blocks):
    """``duplicate_of`` is derived from the layout; the forward's sources agree bit for bit:
    copies are equal, every other pair of sources differs."""
    model = tiny_attnres(flavour, routing_mode, n_layers, n_blocks, 0, routers="queries", query_scale=0.5,
                         n_heads=4, d_mlp=64, d_vocab=64, n_ctx=64)
    tokens = torch.randint(64, (2, 7), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_sources"))
    table = model.source_table()
    assert list(table.columns[-2:]) == ["duplicate_of", "n_copies"]
    for spec in model.router_specs:
        rows = table[table.router == spec.name]
        sources = cache[f"{spec.name}.hook_sources"]
        for i in range(spec.n_sources):
            for j in range(i + 1, spec.n_sources):
                same = bool(torch.equal(sources[:, :, i], sources[:, :, j]))
                assert same == (rows.duplicate_of.iloc[j] is not pd.NA and rows.duplicate_of.iloc[j] == i), (spec.name, i, j)
        copies = rows.duplicate_of.notna().sum()
        assert (rows.n_copies > 1).sum() == 2 * copies
    if flavour == "kimi":
        assert table.duplicate_of.isna().all()


def _wrapped_qwen3() -> HookedAttnResTransformer:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    )
    hf = transformers.Qwen3ForCausalLM(cfg).eval()
    # one layer per block: every attention router reads the snapshot just taken and the stream
    return HookedAttnResTransformer.from_pretrained(hf, flavour="cumulative", n_blocks=3, schedule="recency", recency_bias=3.0)


def _loss_with(model, tokens, router, edit) -> np.ndarray:
    def hook(t, hook):
        return edit(t.clone())

    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(f"{router}.hook_weights", hook)])
    return per_prompt_loss(logits, tokens).double().numpy()


def test_wrapped_qwen3_merged_slice_matches_hand_written_hooks():
    """On the bundled trained vanilla Qwen3, recency-wrapped (bias 3, one layer per block),
    layer 1 attention reads ``after block 0`` and ``stream``, one tensor. Zeroing both copies
    (the merged slice) has a large effect; zeroing one copy is almost entirely undone by the
    other. Both equal plain TL hooks."""
    model = bundled.load_wrapped_baseline()
    tokens = bundled.eval_tokens(model, n_prompts=6, seq_len=64)
    router = "blocks.1.attn_router"
    clean = _loss_with(model, tokens, router, lambda t: t)

    def zero(indices):
        def edit(t):
            t[..., indices] = 0.0
            return t

        return edit

    both = _loss_with(model, tokens, router, zero([1, 2])) - clean
    stream_only = _loss_with(model, tokens, router, zero([2])) - clean

    merged = sweep_sources(model, tokens, progress=False, routers=[router]).set_index("source")
    assert merged.loc[1, "label"] == "after block 0 = stream" and merged.loc[1, "n_copies"] == 2
    assert 2 not in merged.index  # the copy is reported with its first holder
    np.testing.assert_allclose(merged.loc[1, "effect_per_prompt"], both, atol=1e-6, rtol=0)
    per_copy = sweep_sources(model, tokens, progress=False, routers=[router], merge_duplicates=False).set_index("source")
    np.testing.assert_allclose(per_copy.loc[2, "effect_per_prompt"], stream_only, atol=1e-6, rtol=0)
    # the stream holds most of the mass, yet alone it hardly matters: its copy compensates
    assert per_copy.loc[2, "mass"] > 0.8
    assert abs(both.mean()) > 20 * abs(stream_only.mean())
    assert merged.loc[1, "mass"] == pytest.approx(per_copy.loc[1, "mass"] + per_copy.loc[2, "mass"], abs=1e-6)


@pytest.mark.parametrize("mode", ["zero", "mask", "scale", "mean", "patch", "resample"])
def test_every_mode_hits_every_copy(mode):
    """The merged slice's intervention equals a hand-written hook acting on both copies."""
    model = _wrapped_qwen3()
    with torch.no_grad():  # content-dependent routing, so that mean/patch/resample change something
        for _, r in model.routers():
            r.proj.weight.normal_(0.0, 0.5)
    tokens = torch.randint(96, (4, 10), generator=torch.Generator().manual_seed(2))
    other = torch.randint(96, (4, 10), generator=torch.Generator().manual_seed(3))
    router, copies = "blocks.2.attn_router", [2, 3]
    _, ref_cache = model.run_with_cache(other, names_filter=lambda n: n.endswith("hook_weights"))
    _, own_cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_weights"))
    ref = ref_cache[f"{router}.hook_weights"]
    own = own_cache[f"{router}.hook_weights"]
    kwargs: dict = {}
    if mode == "zero":
        def edit(t):
            t[..., copies] = 0.0
            return t
    elif mode == "mask":
        def edit(t):
            t[..., copies] = 0.0
            return t / t.sum(-1, keepdim=True)
    elif mode == "scale":
        kwargs = dict(factor=0.3)

        def edit(t):
            t[..., copies] *= 0.3
            return t
    elif mode == "mean":
        kwargs = dict(reference=other)

        def edit(t):
            t[..., copies] = ref.mean(0, keepdim=True)[..., copies]
            return t
    elif mode == "patch":
        kwargs = dict(reference=other)

        def edit(t):
            t[..., copies] = ref[..., copies]
            return t
    else:
        perm = resample_indices(4, seed=0)

        def edit(t):
            t[..., copies] = own[perm][..., copies]
            return t
    expected = _loss_with(model, tokens, router, edit) - _loss_with(model, tokens, router, lambda t: t)
    table = sweep_sources(model, tokens, mode=mode, progress=False, routers=[router], **kwargs).set_index("source")
    np.testing.assert_allclose(table.loc[2, "effect_per_prompt"], expected, atol=2e-6, rtol=0)


def test_families_partition_the_merged_slices():
    """Family rows follow the first holder's family: their masses at a router sum to 1, and a
    family whose only member is a copy has no row there."""
    model = _wrapped_qwen3()
    tokens = torch.randint(96, (3, 8), generator=torch.Generator().manual_seed(4))
    fams = sweep_sources(model, tokens, groups="family", progress=False, metric="kl")
    for router, rows in fams.groupby("router"):
        np.testing.assert_allclose(np.stack(rows.mass_per_prompt).sum(0), 1.0, atol=1e-5)
    at_l1 = fams[fams.router == "blocks.1.attn_router"].set_index("family")
    assert "current" not in at_l1.index and at_l1.loc["history", "label"] == "history: after block 0 = stream"
    per_copy = sweep_sources(model, tokens, groups="family", progress=False, metric="kl", merge_duplicates=False)
    assert "current" in set(per_copy[per_copy.router == "blocks.1.attn_router"].family)
    bands = sweep_sources(model, tokens, groups="family_band", progress=False, metric="kl")
    assert not ((bands.family == "current") & (bands.sublayer == "attn")).any()


def test_merge_duplicates_is_a_bool():
    model = _wrapped_qwen3()
    with pytest.raises(TypeError, match="merge_duplicates"):
        sweep_sources(model, torch.zeros(2, 4, dtype=torch.long), progress=False, merge_duplicates="yes")


def test_report_merges_duplicates_or_flags_compensated_copies():
    """The report says how many pairs were merged and where; per copy, the compensated copy
    is flagged and carries the merged effect."""
    from attnres_lens.attribution import FLAG_COMPENSATED_BY_DUPLICATE, mass_vs_effect

    model = bundled.load_wrapped_baseline()
    tokens = bundled.eval_tokens(model, n_prompts=6, seq_len=48)
    merged = mass_vs_effect(model, tokens, n_boot=50, gradient=False)
    dup = merged.settings["duplicates"]
    assert dup["merged"] and dup["n_pairs"] == 4 and dup["where"][1] == "L1 attn: [1] after block 0 = [2] stream"
    assert "duplicates: 4 pairs" in merged.summary() and "L1 attn: [1] after block 0 = [2] stream" in merged.to_markdown()
    assert merged.to_dict()["settings"]["duplicates"]["n_pairs"] == 4
    row = merged.table.set_index("name").loc["L1 attn: [1] after block 0 = stream"]
    assert row["flag"] == ""
    per_copy = mass_vs_effect(model, tokens, n_boot=50, gradient=False, merge_duplicates=False)
    table = per_copy.table.set_index(["router", "source"])
    stream = table.loc[("blocks.1.attn_router", 2)]
    assert stream["flag"] == FLAG_COMPENSATED_BY_DUPLICATE
    assert stream["merged_effect"] == pytest.approx(row["effect"], abs=1e-6)
    assert per_copy.settings["duplicates"]["n_compensated"] >= 1
    assert FLAG_COMPENSATED_BY_DUPLICATE in per_copy.to_markdown()
    assert np.isnan(table.loc[("blocks.0.mlp_router", 0), "merged_effect"])
