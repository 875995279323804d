"""Issue O: every public AttnRes layout loads and matches its repository's forward, or is refused
by name (``docs/checkpoints.md``, "Public layouts").

The references (tests/layout_refs.py) re-implement each repository's forward over Hugging Face's
Qwen3 modules; the checkpoints are written with that repository's keys and config fields."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from attnres_lens import HookedAttnResTransformer, tl_bridge
from attnres_lens.cli import main
from attnres_lens.loading import CheckpointError
from layout_refs import LAYOUTS, nano, reference, write_layout, write_nano

TOL = 1e-5
TOKENS = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(7))
LOADING = ["delta-full", "open-block"]


@pytest.fixture(scope="module", params=LOADING)
def written(request, tmp_path_factory):
    """(layout, directory, reference logits, reference weights per router)."""
    layout = request.param
    directory = tmp_path_factory.mktemp(layout)
    base, routers, config = write_layout(directory, layout)
    logits, weights = reference(layout, base, routers, config, TOKENS)
    return layout, directory, logits, weights


def _assert_parity(logits, weights_by_router, ref_logits, ref_weights, names):
    assert len(names) == len(ref_weights)
    assert (logits - ref_logits).abs().max() < TOL
    for name, ref in zip(names, ref_weights):
        got = weights_by_router[name]
        assert got.shape == ref.shape, name
        assert (got - ref).abs().max() < TOL, name


def test_from_pretrained_matches_the_repository_forward(written):
    layout, directory, ref_logits, ref_weights = written
    model = HookedAttnResTransformer.from_pretrained(directory)
    logits, cache = model.run_with_cache(TOKENS)
    names = [spec.name for spec in model.router_specs]
    _assert_parity(logits, {n: cache[f"{n}.hook_weights"] for n in names}, ref_logits, ref_weights, names)
    # the references route on content: no router is uniform (a zero query would hide the layout)
    assert all(w.std(dim=(0, 1)).max() > 1e-3 for w in ref_weights[1:])


def test_the_hugging_face_auto_class_matches_the_repository_forward(written):
    from transformers import AutoModelForCausalLM

    layout, directory, ref_logits, ref_weights = written
    hf = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        logits = hf(TOKENS).logits
    mass = hf.routing_mass(TOKENS)
    _assert_parity(logits, mass, ref_logits, ref_weights, list(mass))


@pytest.mark.skipif(tl_bridge.UNAVAILABLE_REASON is not None, reason=str(tl_bridge.UNAVAILABLE_REASON))
def test_the_tl4_bridge_matches_the_repository_forward(written):
    from transformer_lens.model_bridge import TransformerBridge

    from attnres_lens.tokenizer import hf_byte_tokenizer

    layout, directory, ref_logits, ref_weights = written
    bridge = TransformerBridge.boot_transformers(str(directory), device="cpu", tokenizer=hf_byte_tokenizer())
    logits, cache = bridge.run_with_cache(TOKENS)
    names = [spec.name for spec in tl_bridge.attnres_model(bridge).router_specs]
    _assert_parity(logits, {n: cache[f"{n}.hook_weights"] for n in names}, ref_logits, ref_weights, names)


def test_save_pretrained_round_trips_in_the_layout_it_came_in(written, tmp_path):
    layout, directory, _, _ = written
    HookedAttnResTransformer.from_pretrained(directory).save_pretrained(tmp_path)
    before, after = load_file(str(directory / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    config, again = json.loads((directory / "config.json").read_text()), json.loads((tmp_path / "config.json").read_text())
    for field in ("model_type", "attnres_mode", "attnres_gate_type", "num_hidden_layers", "hidden_size"):
        assert again[field] == config[field], field


def test_inspect_names_the_layout_and_its_routers(written, capsys):
    layout, directory, _, ref_weights = written
    assert main(["inspect", str(directory)]) == 0
    out = capsys.readouterr().out
    says = {"delta-full": "kimi full: delta-attention-residuals attnres_mode 'full'",
            "open-block": "kimi block with recency biases: open-attention-residuals"}[layout]
    assert f"layout      {says}" in out
    assert "final_router" in out and f"routers ({len(ref_weights)})" in out


# ---------------------------------------------------------------------------- refused by name
def test_kimi_full_is_the_libraries_own_kimi_full_mode(tmp_path):
    write_layout(tmp_path, "delta-full")
    model = HookedAttnResTransformer.from_pretrained(tmp_path)
    assert (model.cfg.flavour, model.cfg.routing_mode) == ("kimi", "full")
    assert [s.label for s in model.router_specs[-1].sources] == ["emb"] + [
        f"{sub} {l}" for l in range(model.cfg.n_layers) for sub in ("attn", "mlp")
    ]


def test_open_block_sources_hold_the_embedding_twice_and_in_block_0(tmp_path):
    write_layout(tmp_path, "open-block", n_layers=4)  # 2 blocks of 2 layers
    model = HookedAttnResTransformer.from_pretrained(tmp_path)
    assert (model.cfg.flavour, model.cfg.routing_mode, model.checkpoint_format) == ("kimi", "open_block", "qwen3_attnres/kimi-open")
    specs = {spec.name: spec for spec in model.router_specs}
    assert [s.label for s in specs["blocks.0.attn_router"].sources] == ["emb", "partial"]
    assert specs["blocks.0.attn_router"].sources[1].members == frozenset({-1})  # a copy of the embedding
    assert [s.label for s in specs["final_router"].sources] == ["emb", "block 0", "partial"]
    assert specs["final_router"].sources[1].members == frozenset({-1, 0, 1, 2, 3})  # emb + layers 0-1
    assert all(router.bias is not None for _, router in model.routers())  # the final router's too


@pytest.mark.parametrize(
    "mode, says",
    [
        ("delta", "h = x \\+ softmax-weighted sum of the earlier sublayer outputs"),
        ("full_additive", "full_additive mode"),
        ("first_layer", "two-source router"),
        ("pre_gated", "sigmoid gate"),
        ("delta_block_v", "second router"),
        ("delta_sublayer", "without a final router"),
    ],
)
def test_delta_modes_are_refused_with_what_they_compute(tmp_path, mode, says):
    write_layout(tmp_path, "delta-full")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "attnres_mode": mode}))
    with pytest.raises(CheckpointError, match=rf"attnres_mode '{mode}' is not supported; .*{says}"):
        HookedAttnResTransformer.from_pretrained(tmp_path)


def test_delta_centered_reset_runs_the_full_branch_and_loads_as_full(tmp_path):
    base, routers, config = write_layout(tmp_path, "delta-full")
    ref_logits, _ = reference("delta-full", base, routers, config, TOKENS)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "attnres_mode": "delta_centered_reset"}))
    model = HookedAttnResTransformer.from_pretrained(tmp_path)
    assert model.cfg.routing_mode == "full" and (model(TOKENS) - ref_logits).abs().max() < TOL


@pytest.mark.parametrize(
    "gate, says",
    [("sigmoid_scalar", "res_gate_logit"), ("sigmoid_vector", "res_gate_proj"), ("learnable_alpha", "res_alpha")],
)
def test_gate_types_are_refused_with_what_they_compute(tmp_path, gate, says):
    write_layout(tmp_path, "open-block")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "attnres_gate_type": gate}))
    with pytest.raises(CheckpointError, match=rf"attnres_gate_type '{gate}' is not supported; .*{says}"):
        HookedAttnResTransformer.from_pretrained(tmp_path)


def test_the_null_source_is_refused_by_name(tmp_path):
    write_layout(tmp_path, "delta-full")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "attnres_use_null_source": True}))
    with pytest.raises(CheckpointError, match=r"attnres_use_null_source=True is not supported.*null_source"):
        HookedAttnResTransformer.from_pretrained(tmp_path)


def test_the_babylm_nanogpt_layout_is_refused_by_name(tmp_path):
    config, state = write_nano(tmp_path)
    with pytest.raises(CheckpointError, match=r"model_type 'nanogpt' is not supported.*BabyLM nanoGPT.*Block AttnRes"):
        HookedAttnResTransformer.from_pretrained(tmp_path)
    # the reference the nanoGPT component set will be checked against routes on content
    logits, weights = nano(config, state, TOKENS)
    assert [w.shape[-1] for w in weights] == [1, 2, 2, 3, 3]  # 2 layers, blocks of 2 sublayers
    assert all(w.std(dim=(0, 1)).max() > 1e-3 for w in weights[1:]) and logits.shape == (2, 9, 300)


@pytest.mark.parametrize("fields, kind", [
    ({"use_attn_res": True, "use_static_attn_res": True}, "the static-routing control"),
    ({"use_attn_res": False, "use_static_attn_res": False}, "a plain residual baseline"),
])
def test_each_babylm_variant_is_named_for_what_it_is(tmp_path, fields, kind):
    """The static control's export sets use_attn_res too, so it must not be called Block AttnRes."""
    write_nano(tmp_path, **fields)
    with pytest.raises(CheckpointError, match=rf"model_type 'nanogpt' is not supported.*{kind}") as refused:
        HookedAttnResTransformer.from_pretrained(tmp_path)
    assert "Block AttnRes" not in str(refused.value)


@pytest.mark.parametrize("layout", sorted(set(LAYOUTS) - set(LOADING)))
def test_layouts_not_loaded_yet_are_refused_by_name(tmp_path, layout):
    write_layout(tmp_path, layout)
    says = {"mhar-full_mh": "attnres_mode 'full_mh' is not supported; .*per-head routing"}[layout]
    with pytest.raises(CheckpointError, match=says):
        HookedAttnResTransformer.from_pretrained(tmp_path)
