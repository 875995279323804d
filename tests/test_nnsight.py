"""Issue G: module-level tools (nnsight, plain torch hooks) see the same activations as TL hooks."""

from __future__ import annotations

import pytest
import torch
from reference import tiny_attnres

from attnres_lens import DepthState

TOKENS = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(9))


def routed(flavour: str):
    return tiny_attnres(flavour, "block", 4, 2, seed=1, n_heads=4, n_key_value_heads=2, d_mlp=40, n_ctx=16)


@pytest.mark.parametrize("flavour", ["kimi", "cumulative"])
def test_torch_forward_hooks_on_blocks_see_the_depth_state(flavour):
    model = routed(flavour)
    _, cache = model.run_with_cache(TOKENS)
    seen = []
    handle = model.blocks[1].register_forward_hook(lambda module, args, output: seen.append(output))
    try:
        model(TOKENS)
    finally:
        handle.remove()
    assert len(seen) == 1 and isinstance(seen[0], DepthState)
    if flavour == "cumulative":
        expected = cache["blocks.1.hook_resid_post"]
    else:  # layer 1 closes block 0 (2 layers per block): the partial sum of all four sublayers
        expected = sum(cache[f"blocks.{l}.hook_{s}_out"] for l in range(2) for s in ("attn", "mlp"))
    assert (seen[0].current - expected).abs().max().item() <= 1e-5


def test_materialize_switches_feed_plain_torch_hooks():
    model = routed("kimi")
    _, cache = model.run_with_cache(TOKENS)
    captured = {}
    hooks = [
        model.blocks[2].attn.hook_pattern.register_forward_hook(lambda m, a, out: captured.__setitem__("pattern", out)),
        model.blocks[2].ln1.hook_scale.register_forward_hook(lambda m, a, out: captured.__setitem__("scale", out)),
    ]
    try:
        model(TOKENS)
        assert captured == {}  # fused by default: nothing to see
        model.set_materialize_patterns(True)
        model.set_materialize_norm_scales(True)
        fused_off = model(TOKENS)
    finally:
        for hook in hooks:
            hook.remove()
        model.set_materialize_patterns(False)
        model.set_materialize_norm_scales(False)
    assert torch.allclose(captured["pattern"], cache["blocks.2.attn.hook_pattern"], atol=1e-6)
    assert torch.allclose(captured["scale"], cache["blocks.2.ln1.hook_scale"], atol=1e-6)
    assert torch.allclose(fused_off, model(TOKENS), atol=1e-5)


@pytest.mark.parametrize("flavour", ["kimi", "cumulative"])
def test_nnsight_reads_and_sets_router_weights_and_block_outputs(flavour):
    nnsight = pytest.importorskip("nnsight", reason="nnsight is not installed (pip install nnsight)")
    model = routed(flavour)
    logits, cache = model.run_with_cache(TOKENS)
    wrapped = nnsight.NNsight(model)
    with wrapped.trace(TOKENS):
        weights = wrapped.blocks[1].mlp_router.hook_weights.output.save()
        state = wrapped.blocks[3].output.save()
        out = wrapped.output.save()
    assert torch.allclose(weights, cache["blocks.1.hook_mlp_router_weights"], atol=1e-6)
    assert isinstance(state, DepthState)
    expected = cache["blocks.3.hook_resid_post"] if flavour == "cumulative" else cache["final_router.hook_sources"][:, :, -1]
    assert torch.allclose(state.current, expected, atol=1e-5)
    assert torch.allclose(out, logits, atol=1e-5)

    with wrapped.trace(TOKENS):
        wrapped.blocks[1].mlp_router.hook_weights.output[:] = 0.0
        wrapped.blocks[1].mlp_router.hook_weights.output[..., 0] = 1.0
        edited = wrapped.output.save()

    def only_embedding(act, hook):
        act[:] = 0.0
        act[..., 0] = 1.0
        return act

    reference = model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.1.mlp_router.hook_weights", only_embedding)])
    assert torch.allclose(edited, reference, atol=1e-6) and (edited - logits).abs().max().item() > 1e-3
