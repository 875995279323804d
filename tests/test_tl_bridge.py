"""TransformerLens' TransformerBridge over qwen3_attnres checkpoints (``attnres_lens.tl_bridge``).

The bridge runs this library's modules, so every comparison is against
``HookedAttnResTransformer.from_pretrained`` on the same directory; that model's own numbers are
checked against Hugging Face's Qwen3 elsewhere (tests/test_loading.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from attnres_lens import HookedAttnResTransformer, autoregister, tl_bridge
from attnres_lens.compat import PATCHING_HAS_REDUCE, patching
from attnres_lens.tokenizer import ByteTokenizer, hf_byte_tokenizer
from reference import tiny_attnres

pytestmark = pytest.mark.skipif(
    tl_bridge.UNAVAILABLE_REASON is not None, reason=str(tl_bridge.UNAVAILABLE_REASON)
)

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
TOKENS = torch.tensor([list(b"The router reads depth."), list(b"Blocks close; sources grow")[:23]])


def _boot(directory, **kwargs):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(str(directory), device="cpu", **kwargs)


@pytest.fixture(scope="module", params=["kimi", "cumulative"])
def pair(request, tmp_path_factory):
    """(bridge, our model) loaded from one tiny checkpoint directory."""
    directory = tmp_path_factory.mktemp(request.param)
    tiny_attnres(request.param).save_pretrained(directory)
    bridge = _boot(directory, tokenizer=hf_byte_tokenizer())
    return bridge, HookedAttnResTransformer.from_pretrained(directory)


def _router_names(model):
    return [spec.name for spec in model.router_specs]


def test_boot_picks_our_adapter_and_the_plain_forward_is_our_model(pair):
    bridge, ours = pair
    assert type(bridge.adapter) is tl_bridge.AttnResArchitectureAdapter
    assert tl_bridge.attnres_model(bridge).cfg.flavour == ours.cfg.flavour
    with torch.no_grad():
        # TL boots with output_attentions=True, so the attention patterns are materialised
        # (float32 rounding of an explicit softmax instead of the fused kernel)
        assert (bridge(TOKENS) - ours(TOKENS)).abs().max() < TOL
        assert torch.allclose(bridge(TOKENS, return_type="loss"), ours(TOKENS, return_type="loss"))


def test_run_with_cache_gives_our_routing_and_logits(pair):
    bridge, ours = pair
    logits, cache = bridge.run_with_cache(TOKENS)
    ref_logits, ref_cache = ours.run_with_cache(TOKENS)
    assert (logits - ref_logits).abs().max() < TOL
    names = _router_names(ours)
    assert ("final_router" in names) == (ours.cfg.flavour == "kimi")
    for router in names:
        for part in ("sources", "logits", "weights", "out"):
            key = f"{router}.hook_{part}"
            assert (cache[key] - ref_cache[key]).abs().max() < TOL, key
    # TL's sublayer hooks, with TL's meanings, are the same tensors as ours
    for key in ("hook_embed", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_in", "blocks.2.attn.hook_pattern",
                "blocks.2.mlp.hook_post", "blocks.3.ln2.hook_normalized", "ln_final.hook_normalized"):
        assert (cache[key] - ref_cache[key]).abs().max() < TOL, key


def test_editing_routing_mass_on_the_bridge_changes_the_output_as_on_our_model(pair):
    bridge, ours = pair

    def to_first_source(mass, hook):
        out = torch.zeros_like(mass)
        out[..., 0] = 1.0
        return out

    hooks = [("blocks.2.attn_router.hook_weights", to_first_source)]
    with torch.no_grad():
        clean = ours(TOKENS)
        edited = bridge.run_with_hooks(TOKENS, fwd_hooks=hooks)
        expected = ours.run_with_hooks(TOKENS, fwd_hooks=hooks)
    assert (edited - clean).abs().max() > 1e-2  # the edit matters
    assert (edited - expected).abs().max() < TOL
    assert not any(hp.fwd_hooks for hp in bridge.hook_dict.values())  # removed afterwards


def test_generic_activation_patch_runs_on_the_bridge_as_on_our_model(pair):
    bridge, ours = pair
    clean, corrupted = TOKENS[:1], TOKENS[1:]
    answer = int(clean[0, -1])

    def metric(logits):
        return logits[0, -1, answer]

    results = []
    for model in (bridge, ours):
        _, clean_cache = model.run_with_cache(clean)
        kwargs = {"reduce": "scalar"} if PATCHING_HAS_REDUCE else {}
        results.append(
            patching.generic_activation_patch(
                model, corrupted, clean_cache, metric, patching.layer_pos_patch_setter, "mlp_router_weights",
                index_axis_names=("layer", "pos"), **kwargs,
            )
        )
    on_bridge, on_ours = results
    assert on_bridge.shape == (ours.cfg.n_layers, clean.shape[1])
    assert on_bridge.abs().max() > 0 and (on_bridge - on_ours).abs().max() < TOL


def test_kimi_blocks_refuse_stream_tools_and_cumulative_keeps_the_stream(pair):
    bridge, ours = pair
    _, cache = bridge.run_with_cache(TOKENS)
    if ours.cfg.flavour == "kimi":
        assert not any(b.hook_out_is_single_residual_stream for b in bridge.blocks)
        assert not bridge.adapter.component_mapping["blocks"].hook_out_is_single_residual_stream
        assert not any("hook_resid" in name for name in bridge.hook_dict)
        # issue 24: the bridge's cache is this library's routing-aware cache: the stream tools
        # give what HookedAttnResTransformer's give, and a resid hook is refused with our message
        _, ref_cache = ours.run_with_cache(TOKENS)
        assert (cache.accumulated_resid() - ref_cache.accumulated_resid()).abs().max() < TOL
        assert (cache.decompose_resid().sum(0) - cache["final_router.hook_out"]).abs().max() < TOL
        with pytest.raises(KeyError, match="hook_resid_pre.*get_act_patch_depth_state"):
            cache["blocks.0.hook_resid_pre"]
        with pytest.raises(NotImplementedError, match="kimi-flavour AttnRes model has none"):
            bridge(TOKENS, stop_at_layer=2)
        logit_lens = _tl_logit_lens()
        if logit_lens is not None:
            with pytest.raises(ValueError, match="single-stream"):
                logit_lens(bridge, TOKENS)
        return
    assert all(b.hook_out_is_single_residual_stream for b in bridge.blocks)
    pre, mid = cache["blocks.1.hook_resid_pre"], cache["blocks.1.hook_resid_mid"]
    assert torch.allclose(mid, pre + cache["blocks.1.hook_attn_out"], atol=TOL)
    assert torch.equal(cache["blocks.1.hook_in"], pre)
    assert torch.equal(cache["blocks.1.hook_out"], cache["blocks.2.hook_resid_pre"])
    with torch.no_grad():
        assert (bridge(TOKENS, stop_at_layer=2) - ours(TOKENS, stop_at_layer=2)).abs().max() < TOL
    assert cache.accumulated_resid().shape[0] == ours.cfg.n_layers + 1
    logit_lens = _tl_logit_lens()
    if logit_lens is not None:  # the last entry of the lens is the model's prediction
        lens = logit_lens(bridge, TOKENS)
        assert (lens.values[-1] - bridge(TOKENS)[:, -1]).abs().max() < 1e-4


def _tl_logit_lens():
    try:
        from transformer_lens.tools.analysis.logit_lens import logit_lens
    except ImportError:  # TL 3.9 has no logit lens
        return None
    return logit_lens


def test_start_at_layer_is_refused_with_the_reason(pair):
    bridge, _ = pair
    # TL 4 feeds the residual as inputs_embeds, which the Hugging Face model refuses (a residual
    # tensor cannot restart a routed model); TL 3.9's bridge refuses start_at_layer itself
    refusals = "inputs_embeds is not supported|start_at_layer is not supported in TransformerBridge"
    with pytest.raises((ValueError, NotImplementedError), match=refusals):
        bridge(torch.zeros(1, 4, bridge.cfg.d_model), start_at_layer=1)


def test_the_hf_byte_tokenizer_is_the_byte_tokenizer():
    text = "Routing — depth ü\x01!"
    ours, hf = ByteTokenizer(), hf_byte_tokenizer()
    assert hf.encode(text, add_special_tokens=False) == ours.encode(text)
    assert hf.decode(ours.encode(text)) == text
    assert hf.pad_token_id == ours.pad_token_id and hf.bos_token_id is None


def test_bridge_from_model_shares_the_weights_of_a_loaded_model():
    model = tiny_attnres("kimi")
    names = [name for name, _ in model.named_parameters()]
    with torch.no_grad():
        expected = model(TOKENS)
    bridge = tl_bridge.bridge_from_model(model, hf_byte_tokenizer(), device="cpu")
    ours = tl_bridge.attnres_model(bridge)
    assert {p.data_ptr() for p in ours.parameters()} == {p.data_ptr() for p in model.parameters()}
    assert [name for name, _ in model.named_parameters()] == names  # the user's model is untouched
    assert type(model.blocks[0]).__name__ == "AttnResBlock"
    with torch.no_grad():
        assert torch.equal(model(TOKENS), expected)
        assert (bridge(TOKENS) - expected).abs().max() < TOL
        model.unembed.weight.mul_(2.0)  # one set of tensors: an edit shows on the bridge
        assert (bridge(TOKENS) - 2 * expected).abs().max() < 2 * TOL
        model.unembed.weight.div_(2.0)
    with pytest.raises(TypeError, match="HookedAttnResTransformer"):
        tl_bridge.bridge_from_model(object(), hf_byte_tokenizer())


def test_our_tools_run_on_the_bridges_weights_as_on_a_fresh_load(pair, tmp_path):
    bridge, fresh = pair
    model = tl_bridge.attnres_model(bridge)
    bridge_tensors = {p.data_ptr() for p in bridge.original_model.parameters()}
    assert {p.data_ptr() for p in model.parameters()} <= bridge_tensors  # shared, not copied
    tokens = TOKENS[:, :10]
    from attnres_lens import sweep_sources

    swept, expected = sweep_sources(model, tokens, mode="zero"), sweep_sources(fresh, tokens, mode="zero")
    assert swept["effect"].to_numpy() == pytest.approx(expected["effect"].to_numpy(), abs=1e-6)
    _, cache = model.run_with_cache(tokens)
    _, fresh_cache = fresh.run_with_cache(tokens)
    assert set(cache.keys()) == set(fresh_cache.keys())  # the library's hook names, both flavours
    model.save_pretrained(tmp_path / "saved")  # the library's parameter names
    assert torch.equal(HookedAttnResTransformer.from_pretrained(tmp_path / "saved")(tokens), fresh(tokens))
    with pytest.raises(RuntimeError, match="attnres_model"):  # the wrapped modules are not ours to save
        HookedAttnResTransformer.from_pretrained(bridge.original_model)
    with pytest.raises(RuntimeError, match="attnres_model"):
        bridge.original_model.save_pretrained(tmp_path / "wrapped")
    assert not (tmp_path / "wrapped").exists()  # refused before anything is written
    fired = []
    bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn_router.hook_weights", lambda t, hook: fired.append(1))])
    model(tokens)
    assert fired == [1]  # hooks are the bridge's own: running our model does not fire them


def test_the_entry_point_selects_the_adapter_when_the_name_is_known(tmp_path):
    """In a fresh interpreter: the entry point declared in pyproject.toml (installed, or put on
    the path as package metadata when this checkout is not installed with it) gives TL our
    adapter without any register_adapter call, once ``import attnres_lens`` has made the name
    known to TL (which checks SUPPORTED_ARCHITECTURES before it reads entry points)."""
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    assert declared[autoregister.ENTRY_POINT_GROUP] == {autoregister.ARCHITECTURE: autoregister.ENTRY_POINT_VALUE}
    checkpoint = tmp_path / "ckpt"
    tiny_attnres("cumulative").save_pretrained(checkpoint)
    hf_byte_tokenizer().save_pretrained(checkpoint)  # boot_transformers reads it from the directory
    path = [str(ROOT)]
    if not autoregister.entry_point_installed():
        site = tmp_path / "site"
        dist = site / "attnres_lens_entry_point_probe-0.dist-info"
        dist.mkdir(parents=True)
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: attnres-lens-entry-point-probe\nVersion: 0\n")
        (dist / "entry_points.txt").write_text(
            f"[{autoregister.ENTRY_POINT_GROUP}]\n{autoregister.ARCHITECTURE} = {autoregister.ENTRY_POINT_VALUE}\n"
        )
        path.insert(0, str(site))
    script = textwrap.dedent(f"""
        import sys
        import attnres_lens  # all a user imports: the rest registers itself when TL is imported
        from transformer_lens.factories.architecture_adapter_factory import (
            SUPPORTED_ARCHITECTURES, ArchitectureAdapterFactory,
        )
        from transformer_lens.model_bridge import TransformerBridge
        from attnres_lens import autoregister
        assert autoregister.entry_point_installed()
        # registered on TL's import, without importing the bridge (TL 3 imports the factory while
        # transformer_lens itself is still being imported)
        assert SUPPORTED_ARCHITECTURES[{autoregister.ARCHITECTURE!r}] is autoregister.DeferredAdapter
        assert "attnres_lens.tl_bridge" not in sys.modules
        assert {autoregister.ARCHITECTURE!r} not in ArchitectureAdapterFactory._adapters  # nothing registered by hand
        bridge = TransformerBridge.boot_transformers({str(checkpoint)!r}, device="cpu")
        import attnres_lens.tl_bridge as tl_bridge  # loaded by TL from the entry point
        assert type(bridge.adapter) is tl_bridge.AttnResArchitectureAdapter
        print("ENTRY-POINT-OK", bridge.to_tokens("ab", prepend_bos=False).tolist())
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ENTRY-POINT-OK [[97, 98]]" in out.stdout  # the directory's (byte) tokenizer, offline


def test_installing_the_registration_again_registers_at_once_with_what_is_imported():
    import transformer_lens.factories.architecture_adapter_factory as factory

    autoregister.install()  # both libraries are imported in this process: nothing left waiting
    assert not [f for f in sys.meta_path if isinstance(f, autoregister.AfterImport)]
    assert autoregister.ARCHITECTURE in factory.SUPPORTED_ARCHITECTURES
    from transformers import AutoConfig

    assert type(AutoConfig.for_model("qwen3_attnres")).__name__ == "Qwen3AttnResConfig"


def test_the_deferred_adapter_registered_on_tls_import_builds_ours(pair):
    bridge, _ = pair
    assert type(autoregister.DeferredAdapter(bridge.adapter.cfg)) is tl_bridge.AttnResArchitectureAdapter
