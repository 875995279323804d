"""Issue A: the hooked model, both flavours, against Hugging Face Qwen3 and the spec."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from reference import reference_logits, tiny_attnres, tiny_qwen3

import attnres_lens as al
from attnres_lens import AttnResConfig, HookedAttnResTransformer
from attnres_lens.compat import PATCHING_HAS_REDUCE, ActivationCache, patching
from attnres_lens.loading import key_map

TOKENS = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def hf_untied():
    return tiny_qwen3(seed=0, tied=False)


@pytest.fixture(scope="module")
def hf_tied():
    return tiny_qwen3(seed=3, tied=True, n_layers=4)


def small_model(flavour="kimi", mode="block", n_layers=5, n_blocks=2, seed=0, **kw) -> HookedAttnResTransformer:
    model = tiny_attnres(
        flavour, mode, n_layers, n_blocks, seed, n_heads=4, n_key_value_heads=2, d_mlp=48, n_ctx=32, **kw
    )
    with torch.no_grad():
        model.embed.weight.normal_(0, 1)
    return model


def hf_keyed_state(model: HookedAttnResTransformer) -> dict:
    params = dict(model.named_parameters(remove_duplicate=False))
    return {hf: params[ours].detach() for hf, ours in key_map(model.cfg, with_routers=True).items()}


# ---------------------------------------------------------------------------- HF parity
@pytest.mark.parametrize("hf_fixture", ["hf_untied", "hf_tied"])
def test_cumulative_wrap_with_huge_bias_matches_hf(hf_fixture, request):
    hf = request.getfixturevalue(hf_fixture)
    model = HookedAttnResTransformer.from_pretrained(hf, flavour="cumulative", recency_bias=1e4, n_blocks=2)
    with torch.no_grad():
        ref = hf(TOKENS).logits
        out = model(TOKENS)
    assert (out - ref).abs().max().item() <= 1e-5  # measured: 0.0 (same arithmetic as HF)


@pytest.mark.parametrize("hf_fixture", ["hf_untied", "hf_tied"])
def test_kimi_uniform_wrap_matches_hf_within_documented_tolerance(hf_fixture, request):
    hf = request.getfixturevalue(hf_fixture)
    model = HookedAttnResTransformer.from_pretrained(hf, flavour="kimi", n_blocks=2)
    with torch.no_grad():
        ref = hf(TOKENS).logits
        out = model(TOKENS)
    # Documented bound: the uniform wrap is vanilla Qwen3 with each routed norm's eps scaled by
    # n_sources**2, a relative change of at most (n**2 - 1) * eps / (2 * mean(x**2)) per norm;
    # with eps = 1e-6 and activations of order 1, logits agree to 2e-5 relative to their scale.
    assert (out - ref).abs().max().item() <= 2e-5 * ref.abs().max().item()


def test_kimi_uniform_wrap_is_exact_up_to_rounding_when_eps_vanishes():
    hf = tiny_qwen3(seed=5, eps=1e-30)
    model = HookedAttnResTransformer.from_pretrained(hf, flavour="kimi", n_blocks=3)
    with torch.no_grad():
        assert (model(TOKENS) - hf(TOKENS).logits).abs().max().item() <= 2e-5


def test_cumulative_wrap_with_finite_bias_gives_analytic_weights(hf_untied):
    b = 1.7
    model = HookedAttnResTransformer.from_pretrained(hf_untied, flavour="cumulative", recency_bias=b, n_blocks=2)
    _, cache = model.run_with_cache(TOKENS)
    for spec in model.router_specs:
        weights = cache[f"{spec.name}.hook_weights"]
        n = spec.n_sources
        expected = torch.full((n,), 1 / (math.exp(b) + n - 1))
        expected[-1] = math.exp(b) / (math.exp(b) + n - 1)
        assert torch.allclose(weights, expected.expand_as(weights), atol=1e-7, rtol=0)
    assert al.verify_schedule(model, TOKENS) < 1e-6


def test_logits_match_independent_reference_for_every_flavour_and_mode():
    for flavour, mode, n_layers, n_blocks in [
        ("kimi", "block", 5, 2), ("kimi", "block", 4, 4), ("kimi", "full", 3, 3),
        ("cumulative", "block", 5, 2), ("cumulative", "full", 3, 1), ("cumulative", "block", 5, 3),
    ]:
        model = small_model(flavour, mode, n_layers, n_blocks)
        config = {
            "num_hidden_layers": n_layers, "attnres_num_blocks": n_blocks, "rms_norm_eps": model.cfg.eps,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "hidden_size": 32,
            "rope_theta": model.cfg.rotary_base,
        }
        ref, ref_weights = reference_logits(config, hf_keyed_state(model), TOKENS, flavour, mode)
        out, cache = model.run_with_cache(TOKENS)
        assert (out - ref).abs().max().item() < 1e-4, (flavour, mode)
        ours = [cache[f"{s.name}.hook_weights"] for s in model.router_specs]
        assert [w.shape[-1] for w in ours] == [w.shape[-1] for w in ref_weights]
        for a, b in zip(ours, ref_weights):
            assert (a - b).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------- structure
def expected_source_counts(flavour: str, mode: str, L: int, N: int) -> list[int]:
    """Source count per router, straight from the spec's loops."""
    P = max(1, math.ceil(L / N))
    counts = []
    if flavour == "kimi" and mode == "block":
        nB = 0  # B starts empty; p starts as the embedding
        for l in range(L):
            counts.append(nB + 1)  # [*B, p]
            if l % P == 0:
                nB += 1
            counts.append(nB + 1)
        counts.append(nB + 1)
    elif flavour == "kimi":
        counts = list(range(1, 2 * L + 2))
    else:
        nH = 1
        for l in range(L):
            counts.append(nH + 1)
            if mode == "full":
                nH += 1
            counts.append(nH + 1)
            if mode == "full" or (l + 1) % P == 0:
                nH += 1
    return counts


@pytest.mark.parametrize("flavour,mode", [("kimi", "block"), ("kimi", "full"), ("cumulative", "block"), ("cumulative", "full")])
@pytest.mark.parametrize("L,N", [(4, 2), (5, 2), (7, 3), (6, 6), (3, 1)])
def test_source_counts_follow_the_spec(flavour, mode, L, N):
    cfg = AttnResConfig(d_model=16, d_head=8, n_layers=L, n_blocks=N, flavour=flavour, routing_mode=mode)
    model = HookedAttnResTransformer(cfg)
    assert [s.n_sources for s in model.router_specs] == expected_source_counts(flavour, mode, L, N)
    _, cache = model.run_with_cache(torch.randint(0, 256, (1, 5)), names_filter=lambda n: n.endswith("hook_sources"))
    for spec in model.router_specs:
        assert cache[f"{spec.name}.hook_sources"].shape == (1, 5, spec.n_sources, 16)


def test_source_table_columns_and_families():
    model = small_model("kimi", "block", n_layers=5, n_blocks=2)
    table = model.source_table()
    assert list(table.columns) == ["router", "layer", "sublayer", "source", "family", "label", "duplicate_of", "n_copies"]
    assert table.duplicate_of.isna().all() and (table.n_copies == 1).all()  # kimi reads no tensor twice
    assert set(table.family) <= {"embedding", "current", "history"}
    assert (table[table.source == 0].family == "embedding").all()
    # layer 3 starts block 1 (P = 3): its attention router has no "current" source
    start = table[table.router == "blocks.3.attn_router"]
    assert list(start.label) == ["emb", "block 0"] and "current" not in set(start.family)
    assert list(table[table.router == "blocks.3.mlp_router"].label) == ["emb", "block 0", "partial"]
    final = table[table.router == "final_router"]
    assert final.layer.isna().all() and (final.sublayer == "final").all()
    cumulative = small_model("cumulative", "block", n_layers=4, n_blocks=2).source_table()
    assert list(cumulative[cumulative.router == "blocks.2.attn_router"].label) == ["emb", "after block 0", "stream"]
    # the snapshot just taken is the stream: the layout marks the stream as its copy
    assert list(cumulative[cumulative.router == "blocks.2.attn_router"].duplicate_of.astype(object).fillna(-1)) == [-1, -1, 1]
    assert "final_router" not in set(cumulative.router)


# ---------------------------------------------------------------------------- hook edits
@pytest.mark.parametrize("flavour", ["kimi", "cumulative"])
def test_editing_sources_changes_keys_and_values(flavour):
    model = small_model(flavour)
    name = "blocks.3.mlp_router"
    router = model.router(name)
    seen = {}

    def edit(sources, hook):
        edited = sources.clone()
        edited[:, :, 0] = edited[:, :, 0] * 3.0 + 1.0
        seen["sources"] = edited
        return edited

    def grab(name_):
        return lambda t, hook: seen.__setitem__(name_, t)

    model.run_with_hooks(TOKENS, fwd_hooks=[
        (f"{name}.hook_sources", edit), (f"{name}.hook_logits", grab("logits")),
        (f"{name}.hook_weights", grab("weights")), (f"{name}.hook_out", grab("out")),
    ])
    v = seen["sources"]
    keys = torch.nn.functional.rms_norm(v, (v.shape[-1],), router.norm.weight, router.eps)
    logits = keys @ router.query
    if router.bias is not None:
        logits[..., -1] += router.bias
    assert torch.allclose(seen["logits"], logits, atol=1e-5)  # keys follow the edit
    assert torch.allclose(seen["out"], (seen["weights"][..., None] * v).sum(2), atol=1e-5)  # values too


@pytest.mark.parametrize("flavour", ["kimi", "cumulative"])
def test_editing_logits_changes_weights_and_weights_change_out(flavour):
    model = small_model(flavour)
    name = "blocks.1.attn_router"
    seen = {}

    def set_logits(logits, hook):
        new = torch.zeros_like(logits)
        new[..., 0] = 5.0
        return new

    def grab(key):
        return lambda t, hook: seen.__setitem__(key, t)

    model.run_with_hooks(TOKENS, fwd_hooks=[(f"{name}.hook_logits", set_logits), (f"{name}.hook_weights", grab("w"))])
    n = seen["w"].shape[-1]
    expected = torch.softmax(torch.tensor([5.0] + [0.0] * (n - 1)), 0)
    assert torch.allclose(seen["w"], expected.expand_as(seen["w"]), atol=1e-6)

    def one_hot_first(weights, hook):
        new = torch.zeros_like(weights)
        new[..., 0] = 1.0
        return new

    model.run_with_hooks(TOKENS, fwd_hooks=[
        (f"{name}.hook_weights", one_hot_first), (f"{name}.hook_sources", grab("v")), (f"{name}.hook_out", grab("out")),
    ])
    assert torch.equal(seen["out"], seen["v"][:, :, 0])


def test_editing_out_changes_the_sublayer_input_and_logits():
    model = small_model("kimi")
    clean = model(TOKENS)
    seen = {}
    edited = model.run_with_hooks(TOKENS, fwd_hooks=[
        ("blocks.2.attn_router.hook_out", lambda t, hook: t * 0),
        ("blocks.2.hook_attn_in", lambda t, hook: seen.__setitem__("in", t)),
    ])
    assert torch.equal(seen["in"], torch.zeros_like(seen["in"]))
    assert not torch.allclose(clean, edited)


def test_identity_hooks_leave_logits_bit_identical():
    model = small_model("cumulative")
    clean = model(TOKENS)
    names = [n for n in model.hook_dict if "router" in n]
    assert torch.equal(clean, model.run_with_hooks(TOKENS, fwd_hooks=[(n, lambda t, hook: t) for n in names]))


def test_unhooked_forward_matches_fully_cached_forward():
    model = small_model("kimi")
    out, cache = model.run_with_cache(TOKENS)  # caching hooks the pattern: explicit attention path
    assert torch.allclose(model(TOKENS), out, atol=1e-5)
    assert cache["blocks.0.attn.hook_pattern"].shape == (3, 4, 12, 12)


def test_kimi_has_no_resid_hooks_and_cumulative_resid_is_additive():
    kimi = small_model("kimi")
    assert not any("resid" in n for n in kimi.hook_dict)
    model = small_model("cumulative")
    _, cache = model.run_with_cache(TOKENS)
    for l in range(model.cfg.n_layers):
        mid = cache[f"blocks.{l}.hook_resid_pre"] + cache[f"blocks.{l}.hook_attn_out"]
        assert torch.allclose(cache[f"blocks.{l}.hook_resid_mid"], mid, atol=1e-6)
        post = cache[f"blocks.{l}.hook_resid_mid"] + cache[f"blocks.{l}.hook_mlp_out"]
        assert torch.allclose(cache[f"blocks.{l}.hook_resid_post"], post, atol=1e-6)


def test_tl_standard_hook_shapes():
    model = small_model("kimi")
    _, cache = model.run_with_cache(TOKENS)
    b, t = TOKENS.shape
    assert cache["hook_embed"].shape == (b, t, 32)
    assert cache["blocks.1.attn.hook_q"].shape == (b, t, 4, 8)
    assert cache["blocks.1.attn.hook_k"].shape == (b, t, 2, 8)
    assert cache["blocks.1.attn.hook_attn_scores"].shape == (b, 4, t, t)
    assert torch.allclose(cache["blocks.1.attn.hook_pattern"].sum(-1), torch.ones(b, 4, t))
    assert cache["blocks.1.attn.hook_z"].shape == (b, t, 4, 8)
    assert cache["blocks.1.mlp.hook_post"].shape == (b, t, 48)
    assert torch.equal(cache["blocks.1.hook_attn_in"], cache["blocks.1.attn_router.hook_out"])
    assert cache["ln_final.hook_normalized"].shape == (b, t, 32)
    assert cache["final_router.hook_weights"].shape[:2] == (b, t)


def test_forward_with_tokens_that_are_all_padding_but_one_position_runs():
    model = small_model("kimi")
    assert model(torch.zeros(1, 1, dtype=torch.long)).shape == (1, 1, 300)


# ---------------------------------------------------------------------------- TL interop
def test_generic_activation_patch_runs_on_routing_weights():
    model = small_model("kimi")
    clean, corrupt = TOKENS[:1], TOKENS[1:2]
    _, clean_cache = model.run_with_cache(clean)
    assert isinstance(clean_cache, ActivationCache)
    n_src = model.router("blocks.4.attn_router").hook_weights  # noqa: F841 - exists
    rows = [(layer, src) for spec in model.router_specs if spec.sublayer == "attn"
            for layer, src in [(spec.layer, s.index) for s in spec.sources]]
    index_df = pd.DataFrame(rows, columns=["layer", "source"])

    def setter(act, index, clean_act):
        act[..., index[1]] = clean_act[..., index[1]]
        return act

    metric = lambda logits: logits[0, -1, 0]  # noqa: E731
    result = patching.generic_activation_patch(
        model, corrupt, clean_cache, metric, setter, "attn_router_weights", index_df=index_df
    )
    result = result.values if hasattr(result, "values") and not isinstance(result, torch.Tensor) else result
    assert result.shape == (len(rows),)
    # patching weights of the clean run into itself: every cell equals the clean metric
    same = patching.generic_activation_patch(model, clean, clean_cache, metric, setter, "attn_router_weights", index_df=index_df)
    assert torch.allclose(same, metric(model(clean)).expand(len(rows)), atol=1e-5)


def test_tl_head_patching_runs():
    model = small_model("cumulative", n_layers=2, n_blocks=1)
    clean, corrupt = TOKENS[:1, :4], TOKENS[1:2, :4]
    clean_logits, clean_cache = model.run_with_cache(clean)
    metric = lambda logits: (logits[0, -1] - clean_logits[0, -1]).abs().sum()  # noqa: E731
    out = patching.get_act_patch_attn_head_out_by_pos(model, corrupt, clean_cache, metric)
    assert out.shape == (model.cfg.n_layers, 4, model.cfg.n_heads)
    assert torch.isfinite(out).all() and out.abs().sum() > 0


@pytest.mark.skipif(not PATCHING_HAS_REDUCE, reason="reduce= exists from TransformerLens 4.x")
def test_tl4_patching_result_on_routing_weights():
    model = small_model("kimi")
    _, clean_cache = model.run_with_cache(TOKENS)
    index_df = pd.DataFrame([(1, 0), (1, 1)], columns=["layer", "source"])

    def setter(act, index, clean_act):
        act[..., index[1]] = 0.0
        return act

    res = patching.generic_activation_patch(
        model, TOKENS, clean_cache, lambda logits: logits[:, -1, 0], setter, "mlp_router_weights",
        index_df=index_df, reduce="none", baseline=True,
    )
    assert res.values.shape == (2, TOKENS.shape[0]) and res.baseline.shape == (TOKENS.shape[0],)


def test_activation_cache_methods():
    model = small_model("kimi")
    _, cache = model.run_with_cache(TOKENS[:1])
    stacked = cache.stack_activation("pattern")
    assert stacked.shape == (model.cfg.n_layers, 1, 4, 12, 12)
    assert torch.equal(cache["pattern", 2], cache["blocks.2.attn.hook_pattern"])
    single = cache.remove_batch_dim()
    assert single["blocks.0.attn_router.hook_weights"].shape == (12, 1)
    assert torch.equal(cache["blocks.1.hook_mlp_router_weights"], cache["blocks.1.mlp_router.hook_weights"])
    assert "blocks.0.attn_router.hook_logits" in cache.keys()
    assert cache.to("cpu") is not None
    _, only = model.run_with_cache(TOKENS[:1], names_filter="blocks.0.hook_mlp_router_weights")
    assert set(only.keys()) == {"blocks.0.mlp_router.hook_weights", "blocks.0.hook_mlp_router_weights"}


def test_hooks_context_removes_hooks_on_exception():
    model = small_model("kimi")

    def boom(t, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.attn_router.hook_weights", boom)])
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())
    with model.hooks(fwd_hooks=[("blocks.0.hook_attn_router_weights", lambda t, hook: t * 0)]):
        hooked = model(TOKENS)
    assert not torch.allclose(hooked, model(TOKENS))


# ---------------------------------------------------------------------------- tokens & loss
def test_loss_and_return_types():
    model = small_model("cumulative")
    logits, loss = model(TOKENS, return_type="both")
    per_token = model(TOKENS, return_type="loss", loss_per_token=True)
    assert per_token.shape == (3, 11)
    assert torch.allclose(loss, per_token.mean())
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 300), TOKENS[:, 1:].reshape(-1))
    assert torch.allclose(loss, expected, atol=1e-5)
    assert model(TOKENS, return_type=None) is None


def test_byte_tokenizer_round_trip_and_padding_mask():
    model = small_model("kimi")
    tokens = model.to_tokens("héllo")
    assert tokens.shape == (1, 6) and model.to_string(tokens[0]) == "héllo"
    assert model.to_str_tokens("ab") == ["a", "b"]
    batch, mask = model.to_tokens(["hi", "hello"], return_attention_mask=True)
    assert batch.shape == (2, 5) and mask.tolist() == [[1, 1, 0, 0, 0], [1] * 5]
    # right padding changes nothing at the real positions (causal attention, per-position routing)
    assert torch.allclose(model(batch)[0, :2], model("hi")[0], atol=1e-5)
    # padded targets are left out of the loss
    per_token = model(batch, return_type="loss", loss_per_token=True)
    expected = (per_token[0, :1].sum() + per_token[1].sum()) / 5
    assert torch.allclose(model(["hi", "hello"], return_type="loss"), expected, atol=1e-6)


def test_generate_greedy_is_deterministic_and_extends():
    model = small_model("kimi")
    a = model.generate("ab", max_new_tokens=4, do_sample=False, verbose=False)
    assert a.startswith("ab") and a == model.generate("ab", max_new_tokens=4, do_sample=False, verbose=False)
    tokens = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, temperature=1.0, seed=0, verbose=False)
    assert tokens.shape == (1, 6)


def test_hf_tokenizer_is_used_when_attached(hf_untied, tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")
    model = HookedAttnResTransformer.from_pretrained(hf_untied, flavour="kimi", tokenizer=hf_tok)
    assert model.to_tokens("hello world").tolist() == [[1, 2]]
    assert model.to_str_tokens("world hello") == ["world", "hello"]


# ---------------------------------------------------------------------------- bad inputs
def test_bad_tokens_are_refused():
    model = small_model("kimi")
    with pytest.raises(TypeError, match="integer tensor.*float32"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\[batch, pos\].*rank 3"):
        model(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="sequence length 33 exceeds.*n_ctx=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token id 300 is outside the vocabulary \[0, 300\)"):
        model(torch.full((1, 2), 300))
    with pytest.raises(ValueError, match="return_type must be one of"):
        model(TOKENS, return_type="probs")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(flavour="delta"), r"flavour must be one of \('kimi', 'cumulative'\), got 'delta'"),
        (dict(n_blocks=0), r"n_blocks must be an int in \[1, n_layers=4\], got 0"),
        (dict(n_blocks=5), r"n_blocks must be an int in \[1, n_layers=4\], got 5"),
        (dict(n_heads=6, n_key_value_heads=4), r"n_heads=6 must be divisible by n_key_value_heads=4.*valid n_key_value_heads: \[1, 2, 3, 6\]"),
        (dict(d_head=12), r"d_model=32 is not a multiple of d_head=12"),
        (dict(routing_mode="delta_block"), r"routing_mode must be one of \('block', 'full'.*\), got 'delta_block'"),
        (dict(n_blocks=2, layers_per_block=3), "layers_per_block=3 contradicts n_blocks=2"),
        (dict(act_fn="gelu"), "act_fn must be 'silu'"),
    ],
)
def test_invalid_configs_are_refused(kwargs, match):
    base = dict(d_model=32, d_head=8, n_layers=4)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        AttnResConfig(**base)


@pytest.mark.parametrize("flavour", ["kimi", "cumulative"])
def test_fresh_model_routers_are_zero_initialised(flavour):
    cfg = AttnResConfig(d_model=32, d_head=8, n_layers=3, n_blocks=2, flavour=flavour, recency_bias_init=0.5)
    model = HookedAttnResTransformer(cfg)
    for _, router in model.routers():
        assert torch.equal(router.proj.weight, torch.zeros(1, 32))
        assert torch.equal(router.norm.weight, torch.ones(32))
        assert router.bias is None if flavour == "kimi" else float(router.bias.detach()) == 0.5
    assert model.blocks[0].attn.q_proj.weight.std() > 0  # the backbone is still drawn at random
    _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]), names_filter=lambda n: n.endswith("hook_weights"))
    if flavour == "kimi":  # zero queries, no bias: every router averages its sources
        for spec in model.router_specs:
            assert torch.allclose(cache[f"{spec.name}.hook_weights"], torch.full((1, 3, spec.n_sources), 1 / spec.n_sources))


def test_head_dim_independent_of_d_model_is_supported():
    cfg = AttnResConfig(d_model=32, d_head=12, n_heads=4, n_layers=2)  # 4 * 12 != 32, as Qwen3 allows
    assert HookedAttnResTransformer(cfg)(torch.tensor([[1, 2]])).shape == (1, 2, 256)


def test_layers_per_block_alone_sets_n_blocks():
    cfg = AttnResConfig(d_model=32, d_head=8, n_layers=7, layers_per_block=3)
    assert (cfg.n_blocks, cfg.layers_per_block) == (3, 3)
    assert AttnResConfig(d_model=32, d_head=8, n_layers=10, n_blocks=4).layers_per_block == 3


def test_non_qwen3_hf_model_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"unsupported model_type 'llama'.*\('qwen3', 'qwen3_attnres'\)"):
        HookedAttnResTransformer.from_pretrained(llama, flavour="kimi")
    with pytest.raises(TypeError, match="Hugging Face model"):
        HookedAttnResTransformer.from_pretrained(torch.nn.Linear(2, 2), flavour="kimi")


def test_wrap_arguments_are_checked(hf_untied):
    with pytest.raises(ValueError, match="must be wrapped: pass flavour="):
        HookedAttnResTransformer.from_pretrained(hf_untied)
    with pytest.raises(ValueError, match="needs recency_bias"):
        HookedAttnResTransformer.from_pretrained(hf_untied, flavour="cumulative")
    with pytest.raises(ValueError, match=r"schedule 'recency' does not reproduce.*'kimi'"):
        HookedAttnResTransformer.from_pretrained(hf_untied, flavour="kimi", schedule="recency")
    with pytest.raises(ValueError, match="dtype must be one of"):
        HookedAttnResTransformer.from_pretrained(hf_untied, flavour="kimi", dtype="int8")


def test_user_hf_model_is_not_changed(hf_untied):
    before = {k: v.clone() for k, v in hf_untied.state_dict().items()}
    model = HookedAttnResTransformer.from_pretrained(hf_untied, flavour="kimi")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    after = hf_untied.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bfloat16_model_runs_and_tracks_fp32(hf_untied):
    fp32 = HookedAttnResTransformer.from_pretrained(hf_untied, flavour="cumulative", recency_bias=1e4)
    bf16 = HookedAttnResTransformer.from_pretrained(hf_untied, flavour="cumulative", recency_bias=1e4, dtype=torch.bfloat16)
    assert bf16.embed.weight.dtype == torch.bfloat16 and bf16.cfg.dtype == torch.bfloat16
    out = bf16(TOKENS)
    assert out.dtype == torch.bfloat16
    ref = fp32(TOKENS)
    assert torch.corrcoef(torch.stack([out.float().flatten(), ref.flatten()]))[0, 1] > 0.99
