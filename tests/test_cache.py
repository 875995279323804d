"""Issue G: the routing-aware ActivationCache, TL's own cache/patching helpers, depth patching."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

import pytest
import torch
from reference import tiny_attnres

from attnres_lens.cache import AttnResActivationCache, source_members
from attnres_lens.compat import TL_MAJOR, patching
from attnres_lens.depth_patching import get_act_patch_depth_state
from attnres_lens.router import source_layout

TOKENS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(5))


def routed(flavour: str, mode: str = "block", n_layers: int = 4, n_blocks: int = 2):
    model = tiny_attnres(flavour, mode, n_layers, n_blocks, seed=4, n_heads=4, n_key_value_heads=2, d_mlp=40, n_ctx=32)
    with torch.no_grad():
        model.embed.weight.normal_(0, 1)
        for name, param in model.named_parameters():
            if name.endswith(("ln1.weight", "ln2.weight", "ln_final.weight")):
                param.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("flavour,mode", [("kimi", "block"), ("kimi", "full"), ("cumulative", "block"), ("cumulative", "full")])
def test_source_members_match_the_layout_and_the_forward(flavour, mode):
    model = routed(flavour, mode)
    members = source_members(model.cfg)
    assert [len(members[s.name]) for s in source_layout(model.cfg)] == [s.n_sources for s in source_layout(model.cfg)]
    _, cache = model.run_with_cache(TOKENS)
    for spec in model.router_specs:  # every source is the sum of its member components
        sources = cache[f"{spec.name}.hook_sources"]
        for i, components in enumerate(members[spec.name]):
            total = sum(cache._component(c) for c in components)
            assert (sources[:, :, i] - total).abs().max().item() <= 1e-5


@pytest.mark.parametrize("mode", ["block", "full"])
def test_kimi_decompositions_sum_to_what_the_router_outputs(mode):
    model = routed("kimi", mode)
    _, cache = model.run_with_cache(TOKENS)
    assert isinstance(cache, AttnResActivationCache)
    cases = [(None, False, "final_router"), (2, False, "blocks.2.attn_router"), (1, True, "blocks.1.mlp_router")]
    for layer, mlp_input, router in cases:
        target = cache[f"{router}.hook_out"]
        stack, labels = cache.decompose_resid(layer, mlp_input=mlp_input, return_labels=True)
        assert labels[0] == "embed" and (stack.sum(0) - target).abs().max().item() <= 1e-5
        full = cache.get_full_resid_decomposition(layer, mlp_input=mlp_input)
        assert (full.sum(0) - target).abs().max().item() <= 1e-5
        coarse = cache.get_full_resid_decomposition(layer, mlp_input=mlp_input, expand_neurons=False)
        assert (coarse.sum(0) - target).abs().max().item() <= 1e-5
        parts, src_labels = cache.decompose_router(router, return_labels=True)
        table = model.source_table()
        assert src_labels == list(table[table["router"] == router]["label"])
        assert (parts.sum(0) - target).abs().max().item() <= 1e-6
    # the unweighted TL sum is what the issue found wrong: it is far from what ln_final reads
    plain = cache["hook_embed"] + sum(cache[f"blocks.{l}.hook_{s}_out"] for l in range(4) for s in ("attn", "mlp"))
    assert (plain - cache["final_router.hook_out"]).abs().max().item() > 0.1
    acc, acc_labels = cache.accumulated_resid(incl_mid=True, return_labels=True)
    assert acc_labels[:3] == ["0_pre", "0_mid", "1_pre"] and acc_labels[-1] == "final_post"
    assert torch.equal(acc[2], cache["blocks.1.attn_router.hook_out"])


def test_cumulative_keeps_tl_semantics_over_the_stream():
    model = routed("cumulative")
    _, cache = model.run_with_cache(TOKENS)
    stack = cache.decompose_resid(layer=3)
    assert (stack.sum(0) - cache["blocks.3.hook_resid_pre"]).abs().max().item() <= 1e-5
    full = cache.get_full_resid_decomposition()
    assert (full.sum(0) - cache["blocks.3.hook_resid_post"]).abs().max().item() <= 1e-5
    acc = cache.accumulated_resid()
    assert torch.equal(acc[1], cache["blocks.1.hook_resid_pre"])
    parts = cache.decompose_router("blocks.2.mlp_router")
    assert (parts.sum(0) - cache["blocks.2.mlp_router.hook_out"]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("flavour", ["kimi", "cumulative"])
def test_logit_attrs_are_exact_with_and_without_fold_ln(flavour):
    model = routed(flavour)
    answers = TOKENS[:, -1]
    for fold in (False, True):
        if fold:
            model.process_weights_(fold_ln=True)
        logits, cache = model.run_with_cache(TOKENS)
        stack = cache.decompose_resid(pos_slice=-1)
        attrs = cache.logit_attrs(stack, tokens=answers, pos_slice=-1)
        assert attrs.shape == (stack.shape[0], 2)
        expected = logits[torch.arange(2), -1, answers]
        assert (attrs.sum(0) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("flavour", ["kimi", "cumulative"])
def test_tl_cache_helpers_run(flavour):
    model = routed(flavour)
    _, cache = model.run_with_cache(TOKENS)
    heads, labels = cache.stack_head_results(layer=-1, return_labels=True)
    assert heads.shape == (16, 2, 9, model.cfg.d_model) and labels[:2] == ["L0H0", "L0H1"]
    # each head's write z @ W_O sums to attn_out
    z = cache["blocks.0.attn.hook_z"]
    per_head = torch.einsum("bphd,hdm->bphm", z, model.blocks[0].attn.W_O)
    assert (per_head.sum(-2) - cache["blocks.0.hook_attn_out"]).abs().max().item() <= 1e-5
    # the stack's rows: cumulative, the heads' writes into the stream; kimi (issue 24), each
    # weighted by the final router's mass on its source, so they sum to decompose_resid's row
    rows, row_labels = cache.decompose_resid(layer=-1, return_labels=True)
    expected = rows[row_labels.index("0_attn_out")]
    if flavour == "cumulative":
        assert (expected - cache["blocks.0.hook_attn_out"]).abs().max().item() <= 1e-5
    assert (heads[:4].sum(0) - expected).abs().max().item() <= 1e-5
    neurons = cache.get_neuron_results(1)
    assert (neurons.sum(-2) - cache["blocks.1.hook_mlp_out"]).abs().max().item() <= 1e-5


def test_tl4_logit_lens_runs_on_cumulative_and_is_refused_on_kimi():
    if TL_MAJOR < 4:
        pytest.skip("ActivationCache.logit_lens exists from TransformerLens 4")
    cumulative = routed("cumulative")
    _, cache = cumulative.run_with_cache(TOKENS)
    lens = cache.logit_lens()
    assert lens is not None
    kimi = routed("kimi")
    _, cache = kimi.run_with_cache(TOKENS)
    with pytest.raises(ValueError, match=r"accumulated_resid\(apply_ln=True\)"):
        cache.logit_lens()


def test_tl_test_prompt_runs():
    from transformer_lens.utilities import test_prompt

    model = routed("kimi")
    out = io.StringIO()
    with redirect_stdout(out):
        test_prompt("hello wor", "l", model, prepend_space_to_answer=False, top_k=3)
    assert "Rank" in out.getvalue() or "rank" in out.getvalue().lower()


@pytest.mark.parametrize("flavour", ["kimi", "cumulative"])
def test_tl_head_patching_all_pos(flavour):
    model = routed(flavour)
    clean, corrupt = TOKENS[:1], TOKENS[1:]
    clean_logits, clean_cache = model.run_with_cache(clean)
    metric = lambda logits: logits[0, -1, 3] - clean_logits[0, -1, 3]  # noqa: E731
    out = patching.get_act_patch_attn_head_out_all_pos(model, corrupt, clean_cache, metric)
    assert out.shape == (4, 4) and torch.isfinite(out).all() and out.abs().sum() > 0
    # patching the clean run into itself changes nothing
    same = patching.get_act_patch_attn_head_out_all_pos(model, clean, clean_cache, metric)
    assert same.abs().max().item() <= 1e-4


def patch_metric(model, clean, corrupt):
    clean_logits = model(clean)
    corrupt_logits = model(corrupt)
    return lambda logits: (logits[0, -1] - corrupt_logits[0, -1]).norm() / (clean_logits[0, -1] - corrupt_logits[0, -1]).norm()


def test_cumulative_resid_pre_and_resid_post_patches_agree():
    model = routed("cumulative", n_blocks=4)  # one layer per block: every resid_pre aliases a snapshot
    clean, corrupt = TOKENS[:1], TOKENS[1:]
    _, clean_cache = model.run_with_cache(clean)
    metric = patch_metric(model, clean, corrupt)
    pre = patching.get_act_patch_resid_pre(model, corrupt, clean_cache, metric)
    for layer in range(1, 4):
        def patch_post(act, hook, pos=None):
            act[:, pos] = clean_cache[hook.name][:, pos]
            return act
        for pos in (0, 4, 8):
            hook = (f"blocks.{layer - 1}.hook_resid_post", lambda act, hook, pos=pos: patch_post(act, hook, pos))
            post_value = metric(model.run_with_hooks(corrupt, fwd_hooks=[hook])).item()
            assert abs(pre[layer, pos].item() - post_value) <= 1e-5


@pytest.mark.parametrize("flavour", ["kimi", "cumulative"])
def test_depth_state_patching(flavour):
    model = routed(flavour)
    clean, corrupt = TOKENS[:1], TOKENS[1:]
    _, clean_cache = model.run_with_cache(clean)
    metric = patch_metric(model, clean, corrupt)
    result = get_act_patch_depth_state(model, corrupt, clean_cache, metric)
    n_rows = model.cfg.n_sublayers + 1
    assert result.shape == (n_rows, 9)
    # the last position at the readout state is the whole answer: patching it gives the clean run
    assert abs(result[-1, -1].item() - 1.0) <= 1e-4 and result[-1, :-1].abs().max().item() <= 1e-4
    # patching every position of the state reproduces the clean run from any row
    assert torch.allclose(get_act_patch_depth_state(model, corrupt, clean_cache, metric, by_pos=False), torch.ones(n_rows), atol=1e-4)
    if flavour == "cumulative":  # before layer 0 the state is the embedding alone: TL's resid_pre row 0
        pre = patching.get_act_patch_resid_pre(model, corrupt, clean_cache, metric)
        assert torch.allclose(result[0], pre[0].float(), atol=1e-5)
    with pytest.raises(ValueError, match="same \\[batch, pos\\]"):
        get_act_patch_depth_state(model, corrupt[:, :5], clean_cache, metric)


def test_tl_resid_patching_on_kimi_names_the_routing_aware_calls():
    model = routed("kimi")
    clean, corrupt = TOKENS[:1], TOKENS[1:]
    _, clean_cache = model.run_with_cache(clean)
    with pytest.raises(KeyError, match="get_act_patch_depth_state"):
        patching.get_act_patch_resid_pre(model, corrupt, clean_cache, lambda logits: logits.sum())
    with pytest.raises(KeyError, match="get_act_patch_depth_state"):
        clean_cache["resid_post", 1]
