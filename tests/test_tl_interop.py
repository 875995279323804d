"""Issue G: the TransformerLens surface (weights, arguments, processing) against HF Qwen3."""

from __future__ import annotations

import pytest
import torch
from reference import tiny_attnres, tiny_qwen3

from attnres_lens import HookedAttnResTransformer
from attnres_lens.compat import FactoredMatrix

TOKENS = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def hf():
    return tiny_qwen3(seed=0, n_layers=3)


def exact_wrap(hf) -> HookedAttnResTransformer:
    """Cumulative wrap with a huge recency bias: computes HF Qwen3 exactly (see test_model)."""
    return HookedAttnResTransformer.from_pretrained(hf, flavour="cumulative", recency_bias=1e4, n_blocks=2)


def routed(flavour: str, **kw) -> HookedAttnResTransformer:
    model = tiny_attnres(flavour, "block", 4, 2, seed=2, n_heads=4, n_key_value_heads=2, d_mlp=40, n_ctx=48, **kw)
    with torch.no_grad():
        model.embed.weight.normal_(0, 1)
        for name, param in model.named_parameters():
            if name.endswith(("ln1.weight", "ln2.weight", "ln_final.weight")):
                param.uniform_(0.5, 1.5)
    return model


# ---------------------------------------------------------------------------- weight views
def test_attention_and_mlp_weight_views_match_hf_projections(hf):
    model = exact_wrap(hf)
    layer = hf.model.layers[1]
    attn, mlp = model.blocks[1].attn, model.blocks[1].mlp
    x = torch.randn(3, hf.config.hidden_size)
    n_heads, n_kv, d_head = 4, 2, hf.config.head_dim
    with torch.no_grad():
        assert torch.allclose(torch.einsum("bm,hmd->bhd", x, attn.W_Q).flatten(1), layer.self_attn.q_proj(x), atol=1e-5)
        assert torch.allclose(torch.einsum("bm,hmd->bhd", x, attn._W_K).flatten(1), layer.self_attn.k_proj(x), atol=1e-5)
        assert torch.allclose(torch.einsum("bm,hmd->bhd", x, attn._W_V).flatten(1), layer.self_attn.v_proj(x), atol=1e-5)
        z = torch.randn(3, n_heads, d_head)
        assert torch.allclose(torch.einsum("bhd,hdm->bm", z, attn.W_O), layer.self_attn.o_proj(z.flatten(1)), atol=1e-5)
        assert torch.allclose(x @ mlp.W_gate, layer.mlp.gate_proj(x), atol=1e-5)
        assert torch.allclose(x @ mlp.W_in, layer.mlp.up_proj(x), atol=1e-5)
        post = torch.randn(3, hf.config.intermediate_size)
        assert torch.allclose(post @ mlp.W_out, layer.mlp.down_proj(post), atol=1e-5)
    assert attn.W_Q.shape == (n_heads, 64, d_head) and attn.W_O.shape == (n_heads, d_head, 64)
    # TL 3.9's GroupedQueryAttention: W_K repeats the key heads with repeat_interleave
    assert attn._W_K.shape == (n_kv, 64, d_head) and attn.W_K.shape == (n_heads, 64, d_head)
    assert torch.equal(attn.W_K[0], attn._W_K[0]) and torch.equal(attn.W_K[1], attn._W_K[0])
    assert torch.equal(attn.W_V[2], attn._W_V[1]) and torch.equal(attn.W_V[3], attn._W_V[1])
    for bias, shape in ((attn.b_Q, (4, d_head)), (attn.b_K, (4, d_head)), (attn.b_O, (64,)), (mlp.b_in, (96,))):
        assert bias.shape == shape and not bias.any()


def test_weight_views_are_views_not_copies():
    model = routed("kimi")
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    for view, param in ((attn.W_Q, attn.q_proj.weight), (attn._W_K, attn.k_proj.weight), (attn.W_O, attn.o_proj.weight),
                        (mlp.W_in, mlp.up_proj.weight), (mlp.W_out, mlp.down_proj.weight), (model.W_U, model.unembed.weight)):
        assert view.data_ptr() == param.data_ptr() and view._base is not None
    with torch.no_grad():
        attn.q_proj.weight[5, 7] = 123.0  # row 5 = head 0, d_head index 5
        mlp.W_out[3, 2] = -7.0  # edit through the view
    assert attn.W_Q[0, 7, 5].item() == 123.0
    assert mlp.down_proj.weight[2, 3].item() == -7.0


def test_model_level_stacks_factored_matrices_and_labels():
    model = routed("cumulative")
    cfg = model.cfg
    assert model.W_Q.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head)
    assert model.W_K.shape == model.W_V.shape == model.W_Q.shape
    assert model.W_O.shape == (cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_model)
    assert model.W_in.shape == model.W_gate.shape == (cfg.n_layers, cfg.d_model, cfg.d_mlp)
    assert model.W_out.shape == (cfg.n_layers, cfg.d_mlp, cfg.d_model)
    assert torch.equal(model.W_O[2], model.blocks[2].attn.W_O)
    assert model.b_U.shape == (cfg.d_vocab,) and not model.b_U.any()
    assert not model.accumulated_bias(2, mlp_input=True).any()
    assert isinstance(model.OV, FactoredMatrix) and isinstance(model.QK, FactoredMatrix)
    ov = model.OV[1, 3].AB
    assert torch.allclose(ov, model.blocks[1].attn.W_V[3] @ model.blocks[1].attn.W_O[3], atol=1e-6)
    qk = model.QK[0, 2].AB
    assert torch.allclose(qk, model.blocks[0].attn.W_Q[2] @ model.blocks[0].attn.W_K[2].T, atol=1e-6)
    assert model.all_head_labels()[: cfg.n_heads + 1] == ["L0H0", "L0H1", "L0H2", "L0H3", "L1H0"]
    assert len(model.all_head_labels()) == cfg.n_layers * cfg.n_heads


def test_token_helpers():
    model = routed("kimi")
    assert model.to_single_token("a") == ord("a")
    with pytest.raises(ValueError, match="not a single token"):
        model.to_single_token("ab")
    assert model.get_token_position("l", "hello") == 2
    assert model.get_token_position("l", "hello", mode="last") == 3
    with pytest.raises(ValueError, match="does not occur"):
        model.get_token_position("z", "hello")
    with pytest.raises(ValueError, match="mode must be"):
        model.get_token_position("l", "hello", mode="middle")
    assert torch.equal(model.tokens_to_residual_directions("a"), model.W_U[:, ord("a")])
    dirs = model.tokens_to_residual_directions(torch.tensor([[1, 2, 3]]))
    assert dirs.shape == (1, 3, model.cfg.d_model) and torch.equal(dirs[0, 1], model.W_U[:, 2])
    assert model.to_str_tokens(["ab", "c"]) == [["a", "b"], ["c"]]
    assert model.to_str_tokens(torch.tensor([[97, 98], [99, 100]])) == [["a", "b"], ["c", "d"]]
    assert model.to_single_str_token(97) == "a"
    with pytest.raises(TypeError):
        model.to_str_tokens(3.5)


# ---------------------------------------------------------------------------- arguments
def test_to_tokens_padding_side_and_device_arguments():
    model = routed("kimi")
    left, mask = model.to_tokens(["abc", "d"], padding_side="left", return_attention_mask=True)
    assert left.tolist() == [[97, 98, 99], [0, 0, 100]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    right = model.to_tokens(["abc", "d"], padding_side="right", move_to_device=False, truncate=False)
    assert right.tolist() == [[97, 98, 99], [100, 0, 0]] and right.device.type == "cpu"
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right', got 'middle'"):
        model.to_tokens("a", padding_side="middle")
    assert model.tokenizer.encode("ab", add_special_tokens=False, truncation=True) == [97, 98]


def test_left_padding_matches_hf_with_positions_and_mask(hf):
    model = exact_wrap(hf)
    tokens = torch.randint(1, 300, (2, 8), generator=torch.Generator().manual_seed(3))
    tokens[1, :3] = 0
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask, position_ids=positions).logits
        ours = model(tokens, attention_mask=mask)
        unpadded = model(tokens[1:, 3:])
    real = mask.bool()
    assert (ours[real] - ref[real]).abs().max().item() <= 1e-5
    # real tokens compute what they compute unpadded
    assert (ours[1, 3:] - unpadded[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("flavour", ["kimi", "cumulative"])
def test_left_padded_strings_equal_unpadded_runs(flavour):
    model = routed(flavour)
    texts = ["a longer prompt", "short"]
    batch = model(texts, padding_side="left")
    with_hooks = model.run_with_cache(texts, padding_side="left")[0]  # explicit pattern path
    for i, text in enumerate(texts):
        alone = model(text)[0]
        assert (batch[i, -alone.shape[0]:] - alone).abs().max().item() <= 1e-5
        assert (with_hooks[i, -alone.shape[0]:] - alone).abs().max().item() <= 1e-5
    # the loss leaves padded targets out, so it equals the right-padded loss
    left = model(texts, padding_side="left", return_type="loss")
    right = model(texts, padding_side="right", return_type="loss")
    assert abs(left.item() - right.item()) <= 1e-5
    # token input with padding_side="left" derives the mask from the leading pad tokens
    tokens = model.to_tokens(texts, padding_side="left")
    assert torch.allclose(model(tokens, padding_side="left"), batch, atol=1e-6)


@pytest.mark.parametrize("flavour", ["kimi", "cumulative"])
def test_stop_and_start_at_layer(flavour):
    model = routed(flavour)
    _, cache = model.run_with_cache(TOKENS)
    resid = model(TOKENS, stop_at_layer=2)
    if flavour == "cumulative":
        assert torch.allclose(resid, cache["blocks.1.hook_resid_post"], atol=1e-6)
    else:  # the vanilla-stream analogue: embedding plus every sublayer output so far
        parts = [cache["hook_embed"]] + [cache[f"blocks.{l}.hook_{s}_out"] for l in range(2) for s in ("attn", "mlp")]
        assert torch.allclose(resid, torch.stack(parts).sum(0), atol=1e-5)
    state = model(TOKENS, stop_at_layer=2, return_type="state")
    assert torch.equal(model(state, start_at_layer=2), model(TOKENS))
    loss = model(state, start_at_layer=2, tokens=TOKENS, return_type="loss")
    assert torch.allclose(loss, model(TOKENS, return_type="loss"))
    _, partial = model.run_with_cache(TOKENS, stop_at_layer=2)
    assert "blocks.1.mlp_router.hook_out" in partial.keys() and "blocks.2.attn_router.hook_out" not in partial.keys()
    assert torch.allclose(partial["blocks.1.mlp_router.hook_out"], cache["blocks.1.mlp_router.hook_out"], atol=1e-6)
    assert torch.equal(model(TOKENS, stop_at_layer=-2), resid)
    with pytest.raises(TypeError, match="DepthState"):
        model(resid, start_at_layer=2)
    with pytest.raises(ValueError, match=r"stop_at_layer must be an int in \[-4, 4\]"):
        model(TOKENS, stop_at_layer=7)


@pytest.mark.parametrize("flavour", ["kimi", "cumulative"])
def test_kv_cache_generation_equals_recomputation(flavour):
    model = routed(flavour)
    for prompt in (TOKENS[:, :5], ["hello there", "hi"]):
        cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_past_kv_cache=True, verbose=False)
        fresh = model.generate(prompt, max_new_tokens=8, do_sample=False, use_past_kv_cache=False, verbose=False)
        assert (torch.equal(cached, fresh) if isinstance(cached, torch.Tensor) else cached == fresh)
    # batched left-padded generation equals each prompt alone
    together = model.generate(["hello there", "hi"], max_new_tokens=6, do_sample=False, verbose=False)
    assert together[1] == model.generate("hi", max_new_tokens=6, do_sample=False, verbose=False)
    sampled = [model.generate("ab", max_new_tokens=5, top_k=5, top_p=0.9, temperature=0.8, freq_penalty=0.5,
                              seed=4, verbose=False, return_type="tokens") for _ in range(2)]
    assert torch.equal(sampled[0], sampled[1]) and sampled[0].shape == (1, 7)
    tokens = model.generate("ab", max_new_tokens=3, return_type="tokens", do_sample=False, verbose=False)
    assert tokens.shape == (1, 5)
    with pytest.raises(ValueError, match="top_p must be"):
        model.generate("ab", top_p=1.5)


def test_generation_stops_at_eos():
    model = routed("kimi")
    first = model.generate("ab", max_new_tokens=1, do_sample=False, return_type="tokens", verbose=False)[0, -1].item()
    out = model.generate("ab", max_new_tokens=6, do_sample=False, eos_token_id=first, return_type="tokens", verbose=False)
    assert out.shape == (1, 3) and out[0, -1].item() == first


def test_cfg_device_and_dtype_follow_the_model():
    model = routed("kimi")
    model.to(torch.bfloat16)
    assert model.cfg.dtype == torch.bfloat16 and model.embed.weight.dtype == torch.bfloat16
    model.half()
    assert model.cfg.dtype == torch.float16
    model.float().cpu()
    assert model.cfg.dtype == torch.float32 and model.cfg.device == "cpu"


# ---------------------------------------------------------------------------- fold_ln
@pytest.mark.parametrize("flavour", ["kimi", "cumulative"])
def test_fold_ln_keeps_logits_and_makes_dla_exact(flavour):
    model = routed(flavour, tie_word_embeddings=True)
    before = model(TOKENS)
    router_gains = [r.norm.weight.clone() for _, r in model.routers()]
    q_norm = model.blocks[0].attn.q_norm.weight.clone()
    model.process_weights_(fold_ln=True)
    after, cache = model.run_with_cache(TOKENS)
    scale = before.abs().max().item()  # logits of order 15 here: fp32 rounding is ~1e-6 of that
    assert (after - before).abs().max().item() <= 2e-6 * scale
    assert all(torch.equal(g, r.norm.weight) for g, (_, r) in zip(router_gains, model.routers()))
    assert torch.equal(q_norm, model.blocks[0].attn.q_norm.weight)
    assert (model.ln_final.weight == 1).all() and (model.blocks[2].ln1.weight == 1).all()
    assert model.unembed.weight.data_ptr() != model.embed.weight.data_ptr()  # untied before folding
    dla = cache.decompose_resid(apply_ln=True) @ model.W_U
    assert (dla.sum(0) - after).abs().max().item() <= 2e-6 * scale


def test_fold_ln_through_from_pretrained(hf):
    plain = exact_wrap(hf)
    folded = HookedAttnResTransformer.from_pretrained(hf, flavour="cumulative", recency_bias=1e4, n_blocks=2, fold_ln=True)
    assert (folded(TOKENS) - plain(TOKENS)).abs().max().item() <= 1e-5
    assert torch.allclose(folded.W_U, plain.W_U * plain.ln_final.weight[:, None])


def test_centring_options_are_refused_with_the_reason():
    model = routed("kimi")
    before = model.unembed.weight.detach().clone()
    with pytest.raises(ValueError, match="center_writing_weights=True is not exact.*RMSNorm"):
        model.process_weights_(center_writing_weights=True, center_unembed=True)
    with pytest.raises(ValueError, match="QK-norm"):
        model.process_weights_(refactor_factored_attn_matrices=True)
    assert torch.equal(model.unembed.weight, before)  # refused before anything changed


def test_center_unembed_is_applied_and_moves_each_position_by_one_constant():
    # issue 24: TL's center_unembed is exact up to a per-position constant, so it is applied
    model = routed("kimi")
    tokens = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(tokens)
        model.process_weights_(fold_ln=False, center_unembed=True, fold_value_biases=True)
        after = model(tokens)
    assert model.W_U.mean(-1).abs().max().item() < 1e-6
    shift = after - before
    assert (shift - shift[..., :1]).abs().max().item() < 1e-5
    assert (before.log_softmax(-1) - after.log_softmax(-1)).abs().max().item() < 1e-5
