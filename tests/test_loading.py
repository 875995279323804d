"""Issue B: every checkpoint format loads (or is refused) as the spec says; saving round-trips."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from reference import (
    load_checkpoint_state,
    reference_logits,
    router_tensors,
    tiny_qwen3,
    write_attnres_checkpoint,
)
from safetensors.torch import load_file, save_file

import attnres_lens as al
from attnres_lens import HookedAttnResTransformer
from attnres_lens.loading import CheckpointError

TOKENS = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def base():
    return tiny_qwen3(seed=0, n_layers=5)


@pytest.fixture(scope="module")
def base_tied():
    return tiny_qwen3(seed=4, n_layers=4, tied=True)


def weights_of(model: HookedAttnResTransformer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- detection
@pytest.mark.parametrize(
    "flavour,mode,n_blocks,tied",
    [
        ("cumulative", "block", 2, False),  # uneven: 5 layers in blocks of 3 + 2
        ("cumulative", "full", 2, False),
        ("cumulative", "block", 3, True),
        ("kimi", "block", 2, False),
        ("kimi", "block", 4, True),  # 4 layers, 4 blocks
    ],
)
def test_qwen3_attnres_checkpoints_are_detected_and_match_the_spec(tmp_path, base, base_tied, flavour, mode, n_blocks, tied):
    hf = base_tied if tied else base
    write_attnres_checkpoint(tmp_path, hf, flavour, n_blocks=n_blocks, mode=mode)
    model = HookedAttnResTransformer.from_pretrained(tmp_path)
    assert model.checkpoint_format == f"qwen3_attnres/{flavour}"
    n_layers = hf.config.num_hidden_layers
    built = math.ceil(n_layers / max(1, math.ceil(n_layers / n_blocks)))  # 4 layers, 3 asked: 2 built
    assert (model.cfg.flavour, model.cfg.routing_mode, model.cfg.n_blocks) == (flavour, mode, built)
    assert model.cfg.tie_word_embeddings == tied
    assert model.schedule.kind == "none"
    config, state = load_checkpoint_state(tmp_path)
    ref_logits, ref_weights = reference_logits(config, state, TOKENS, flavour, mode)
    logits, cache = model.run_with_cache(TOKENS)
    assert (logits - ref_logits).abs().max().item() < 1e-4
    for spec, expected in zip(model.router_specs, ref_weights, strict=True):
        assert (cache[f"{spec.name}.hook_weights"] - expected).abs().max().item() < 1e-5


def test_vanilla_qwen3_directory_is_wrapped(tmp_path, base):
    base.save_pretrained(tmp_path)
    model = HookedAttnResTransformer.from_pretrained(tmp_path, flavour="cumulative", recency_bias=1e4, n_blocks=2)
    assert model.checkpoint_format == "qwen3"
    assert model.schedule == al.RoutingSchedule("recency", 1e4)
    with torch.no_grad():
        assert (model(TOKENS) - base(TOKENS).logits).abs().max().item() <= 1e-5
    kimi = HookedAttnResTransformer.from_pretrained(tmp_path, flavour="kimi")
    assert kimi.schedule.kind == "uniform" and kimi.cfg.n_blocks == 5  # default min(8, n_layers)


def test_sharded_safetensors_with_index(tmp_path, base):
    base.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model = HookedAttnResTransformer.from_pretrained(tmp_path, flavour="cumulative", recency_bias=1e4, n_blocks=2)
    with torch.no_grad():
        assert (model(TOKENS) - base(TOKENS).logits).abs().max().item() <= 1e-5


def test_pytorch_bin_is_read_with_weights_only(tmp_path, base):
    base.config.save_pretrained(tmp_path)
    torch.save(base.state_dict(), tmp_path / "pytorch_model.bin")
    model = HookedAttnResTransformer.from_pretrained(tmp_path, flavour="kimi", n_blocks=2)
    reference = HookedAttnResTransformer.from_pretrained(base, flavour="kimi", n_blocks=2)
    assert torch.equal(model(TOKENS), reference(TOKENS))


def test_a_pickle_that_runs_code_is_refused(tmp_path, base):
    base.config.save_pretrained(tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"model.embed_tokens.weight": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"torch.load\(weights_only=True\)"):
        HookedAttnResTransformer.from_pretrained(tmp_path, flavour="kimi")
    assert not marker.exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "float32"])
def test_dtype_option(tmp_path, base, dtype):
    write_attnres_checkpoint(tmp_path, base, "cumulative", n_blocks=2)
    model = HookedAttnResTransformer.from_pretrained(tmp_path, dtype=dtype, device="cpu")
    expected = dtype if isinstance(dtype, torch.dtype) else torch.float32
    assert {p.dtype for p in model.parameters()} == {expected}
    assert model(TOKENS).dtype == expected and model.cfg.dtype == expected


def test_tokenizer_is_attached_when_the_directory_holds_one(tmp_path, base):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "routing": 1, "mass": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path)
    write_attnres_checkpoint(tmp_path, base, "kimi", n_blocks=2)
    model = HookedAttnResTransformer.from_pretrained(tmp_path)
    assert model.to_tokens("mass routing").tolist() == [[2, 1]]
    without = HookedAttnResTransformer.from_pretrained(base, flavour="kimi")
    assert isinstance(without.tokenizer, al.ByteTokenizer)


# ---------------------------------------------------------------------------- saving
@pytest.mark.parametrize(
    "make",
    [
        lambda d, base: HookedAttnResTransformer.from_pretrained(write_attnres_checkpoint(d / "src", base, "kimi", n_blocks=2)),
        lambda d, base: HookedAttnResTransformer.from_pretrained(write_attnres_checkpoint(d / "src", base, "cumulative", n_blocks=2, mode="full")),
        lambda d, base: HookedAttnResTransformer.from_pretrained(base, flavour="kimi", n_blocks=3),
        lambda d, base: HookedAttnResTransformer.from_pretrained(base, flavour="cumulative", recency_bias=2.5, n_blocks=2),
        lambda d, base: HookedAttnResTransformer(al.AttnResConfig(d_model=32, d_head=8, n_layers=3, flavour="kimi", routing_mode="full", d_vocab=300)),
    ],
    ids=["kimi-ckpt", "cumulative-full-ckpt", "kimi-wrap", "recency-wrap", "kimi-full-fresh"],
)
def test_save_then_load_is_bit_exact(tmp_path, base, make):
    model = make(tmp_path, base)
    with torch.no_grad():  # make fresh routers non-trivial so the round trip carries information
        for _, router in model.routers():
            if model.schedule.kind == "none":
                router.proj.weight.normal_(0, 0.2)
    model.save_pretrained(tmp_path / "saved")
    loaded = HookedAttnResTransformer.from_pretrained(tmp_path / "saved")
    assert loaded.checkpoint_format == "attnres_lens"
    assert loaded.schedule == model.schedule
    assert loaded.cfg.flavour == model.cfg.flavour and loaded.cfg.routing_mode == model.cfg.routing_mode
    original, reloaded = weights_of(model), weights_of(loaded)
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
    out_a, cache_a = model.run_with_cache(TOKENS, names_filter=lambda n: n.endswith("hook_weights"))
    out_b, cache_b = loaded.run_with_cache(TOKENS, names_filter=lambda n: n.endswith("hook_weights"))
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(cache_a[k], cache_b[k]) for k in cache_a.keys())
    if model.schedule.is_scheduled:
        assert al.verify_schedule(loaded, TOKENS) < 1e-6


def test_saved_layout_is_the_qwen3_attnres_layout_of_the_flavour(tmp_path, base):
    cumulative = HookedAttnResTransformer.from_pretrained(base, flavour="cumulative", recency_bias=3.0, n_blocks=2)
    cumulative.save_pretrained(tmp_path / "c")
    config, state = load_checkpoint_state(tmp_path / "c")
    assert config["model_type"] == "qwen3_attnres" and config["attnres_mode"] == "block"
    assert config["attnres_num_blocks"] == 2 and config["attnres_gate_type"] == "bias"
    assert config["attnres_lens"]["schedule"] == {"kind": "recency", "bias": 3.0}
    assert state["model.layers.0.attn_res_proj.weight"].shape == (1, 64)
    assert state["model.layers.0.attn_res_norm.weight"].shape == (64,)
    assert state["model.layers.4.mlp_res_bias"].shape == () and float(state["model.layers.4.mlp_res_bias"]) == 3.0
    assert not any(k.startswith("model.final_res") for k in state)
    hf_keys = set(base.state_dict())
    assert hf_keys <= set(state)  # every Qwen3 weight under its usual name

    kimi = HookedAttnResTransformer.from_pretrained(base, flavour="kimi", n_blocks=2)
    kimi.save_pretrained(tmp_path / "k")
    _, state = load_checkpoint_state(tmp_path / "k")
    assert state["model.final_res_proj.weight"].shape == (1, 64) and "model.final_res_norm.weight" in state
    assert not any(k.endswith("_res_bias") for k in state)


def test_sharded_save_round_trips(tmp_path, base):
    model = HookedAttnResTransformer.from_pretrained(base, flavour="kimi", n_blocks=2)
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = HookedAttnResTransformer.from_pretrained(tmp_path)
    assert torch.equal(loaded(TOKENS), model(TOKENS))


# ---------------------------------------------------------------------------- schedules
def test_verify_schedule_and_expected_table(base):
    for model in (
        HookedAttnResTransformer.from_pretrained(base, flavour="kimi", n_blocks=2),
        HookedAttnResTransformer.from_pretrained(base, flavour="cumulative", recency_bias=3.0, n_blocks=2),
    ):
        assert al.verify_schedule(model, TOKENS) < 1e-6
        table = al.expected_weights_table(model)
        assert list(table.columns)[-1] == "expected_weight"
        sums = table.groupby("router").expected_weight.sum()
        assert ((sums - 1).abs() < 1e-12).all()
    with torch.no_grad():  # an edited router breaks the schedule, and verify_schedule sees it
        model.router("blocks.2.mlp_router").proj.weight.normal_(0, 1.0)
    assert al.verify_schedule(model, TOKENS) > 1e-3


def test_verify_schedule_refuses_learned_routing(tmp_path, base):
    model = HookedAttnResTransformer.from_pretrained(write_attnres_checkpoint(tmp_path, base, "kimi", n_blocks=2))
    with pytest.raises(ValueError, match="learned, not scheduled"):
        al.verify_schedule(model, TOKENS)


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("mode", ["delta", "delta_block", "full_v", "pre_gated"])
def test_unsupported_attnres_modes_are_refused(tmp_path, base, mode):
    write_attnres_checkpoint(tmp_path, base, "cumulative", n_blocks=2, extra_config={"attnres_mode": mode})
    with pytest.raises(CheckpointError, match=rf"attnres_mode '{mode}' is not supported; supported modes are \('block', 'full'\)"):
        HookedAttnResTransformer.from_pretrained(tmp_path)


def test_unsupported_gate_type_is_refused(tmp_path, base):
    write_attnres_checkpoint(tmp_path, base, "cumulative", n_blocks=2, extra_config={"attnres_gate_type": "sigmoid"})
    with pytest.raises(CheckpointError, match=r"attnres_gate_type 'sigmoid' is not supported.*\('bias',\)"):
        HookedAttnResTransformer.from_pretrained(tmp_path)


def test_kimi_full_mode_from_the_wild_loads_as_the_spec_says(tmp_path, base):
    # Refused until issue O: delta-attention-residuals' attnres_mode "full" is the kimi full mode
    # (its parity with that repository's own forward: tests/test_layouts.py).
    write_attnres_checkpoint(tmp_path, base, "kimi", n_blocks=2, mode="full")
    model = HookedAttnResTransformer.from_pretrained(tmp_path)
    assert (model.cfg.flavour, model.cfg.routing_mode) == ("kimi", "full")
    config, state = load_checkpoint_state(tmp_path)
    expected, _ = reference_logits(config, state, TOKENS, "kimi", "full")
    assert (model(TOKENS) - expected).abs().max() < 1e-5


def _edit_state(directory: Path, edit) -> None:
    state = load_file(str(directory / "model.safetensors"))
    edit(state)
    save_file(state, str(directory / "model.safetensors"))


def test_missing_keys_are_listed_with_the_assumed_format(tmp_path, base):
    write_attnres_checkpoint(tmp_path, base, "cumulative", n_blocks=2)
    _edit_state(tmp_path, lambda s: s.pop("model.layers.3.mlp_res_norm.weight"))
    with pytest.raises(CheckpointError, match=r"assumed format 'qwen3_attnres/cumulative'.*missing \[model.layers.3.mlp_res_norm.weight\]"):
        HookedAttnResTransformer.from_pretrained(tmp_path)


def test_unexpected_keys_are_listed(tmp_path, base):
    write_attnres_checkpoint(tmp_path, base, "kimi", n_blocks=2)
    _edit_state(tmp_path, lambda s: s.update({"model.layers.0.attn_res_gate.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"'qwen3_attnres/kimi'.*unexpected \[model.layers.0.attn_res_gate.weight\]"):
        HookedAttnResTransformer.from_pretrained(tmp_path)


def test_shapes_contradicting_the_config_are_refused(tmp_path, base):
    write_attnres_checkpoint(tmp_path, base, "kimi", n_blocks=2)
    _edit_state(tmp_path, lambda s: s.update({"model.layers.1.attn_res_proj.weight": torch.zeros(2, 64)}))
    with pytest.raises(CheckpointError, match=r"shapes contradict the config.*attn_res_proj.weight: \(2, 64\) \(config says \(1, 64\)\)"):
        HookedAttnResTransformer.from_pretrained(tmp_path)


def test_truncated_and_corrupted_safetensors_are_refused(tmp_path, base):
    write_attnres_checkpoint(tmp_path, base, "kimi", n_blocks=2)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        HookedAttnResTransformer.from_pretrained(tmp_path)
    path.write_bytes(b"\xff" * 64 + data[64:])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        HookedAttnResTransformer.from_pretrained(tmp_path)


def test_directory_without_weights_is_refused(tmp_path, base):
    base.config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no weights in .*expected model.safetensors.*holds \['config.json'\]"):
        HookedAttnResTransformer.from_pretrained(tmp_path, flavour="kimi")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HookedAttnResTransformer.from_pretrained(tmp_path / "..", flavour="kimi")


def test_other_architecture_config_is_refused(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"unsupported model_type 'llama' \(architectures .*\('qwen3', 'qwen3_attnres'\)"):
        HookedAttnResTransformer.from_pretrained(tmp_path, flavour="kimi")


def test_ambiguous_and_routerless_attnres_checkpoints_are_refused(tmp_path, base):
    write_attnres_checkpoint(tmp_path, base, "kimi", n_blocks=2)
    config = json.loads((tmp_path / "config.json").read_text())
    _edit_state(tmp_path, lambda s: s.update({k: v for k, v in router_tensors(config, "cumulative").items() if k.endswith("_bias")}))
    with pytest.raises(CheckpointError, match="ambiguous qwen3_attnres checkpoint"):
        HookedAttnResTransformer.from_pretrained(tmp_path)
    _edit_state(tmp_path, lambda s: [s.pop(k) for k in list(s) if "_res_" in k])
    with pytest.raises(CheckpointError, match="without any router keys"):
        HookedAttnResTransformer.from_pretrained(tmp_path)


def test_arguments_contradicting_a_checkpoint_are_refused(tmp_path, base):
    write_attnres_checkpoint(tmp_path, base, "kimi", n_blocks=2)
    with pytest.raises(ValueError, match="flavour='cumulative' was asked for, but the checkpoint's keys say 'kimi'"):
        HookedAttnResTransformer.from_pretrained(tmp_path, flavour="cumulative")
    with pytest.raises(ValueError, match="n_blocks=3 contradicts the checkpoint's attnres_num_blocks=2"):
        HookedAttnResTransformer.from_pretrained(tmp_path, n_blocks=3)
    with pytest.raises(ValueError, match="schedule/recency_bias only apply when wrapping"):
        HookedAttnResTransformer.from_pretrained(tmp_path, schedule="uniform")


def test_hub_id_that_is_unreachable_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="could not fetch 'nobody/no-such-model'"):
        HookedAttnResTransformer.from_pretrained("nobody/no-such-model", flavour="kimi")
    with pytest.raises(FileNotFoundError, match="neither a local directory nor a hub id"):
        HookedAttnResTransformer.from_pretrained("./missing/dir/x", flavour="kimi")


def test_saving_an_unrepresentable_model_is_refused_before_writing(tmp_path):
    cfg = al.AttnResConfig(d_model=16, d_head=8, n_layers=2, flavour="kimi", router_bias=True)
    with pytest.raises(ValueError, match="kimi-flavour model with router biases has no qwen3_attnres layout"):
        HookedAttnResTransformer(cfg).save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_loading_peak_memory_stays_under_1_3x_the_model(tmp_path):
    """~100 MB checkpoint loaded in a fresh process: peak RSS growth stays under 1.3x the model
    (the model plus one bounded window of the file; no whole-file or double copies)."""
    model = tiny_qwen3(seed=0, vocab=4096, d_model=512, n_layers=6, n_heads=8, n_kv=4, head_dim=64, d_mlp=1536)
    model.save_pretrained(tmp_path / "big")
    tiny_qwen3(seed=0).save_pretrained(tmp_path / "warm-up")
    n_bytes = sum(p.numel() * 4 for p in model.parameters())
    # VmHWM is the peak RSS of this process image (ru_maxrss would carry pytest's over exec).
    script = textwrap.dedent(
        f"""
        import torch, transformers, safetensors, huggingface_hub, attnres_lens.loading, attnres_lens.model
        def status(field):
            line = next(l for l in open('/proc/self/status') if l.startswith(field + ':'))
            return int(line.split()[1]) * 1024
        # the mapped window, small next to this model (its pages and their copies overlap: a
        # window costs up to about twice its budget, 8 MB measured 112-123 MB of growth here)
        attnres_lens.loading._MAP_BUDGET = 2 * 2**20
        # the one-off costs of a first load (torch's meta-tensor set-up, ~70 MB of code, lazy
        # imports, allocator arenas) are paid on a tiny model first, so only the big one is counted
        attnres_lens.HookedAttnResTransformer.from_pretrained({str(tmp_path / "warm-up")!r}, flavour='kimi')
        before = status('VmRSS')
        model = attnres_lens.HookedAttnResTransformer.from_pretrained({str(tmp_path / "big")!r}, flavour='kimi')
        print(before, status('VmHWM') - before)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    grown = int(out.split()[-1])
    assert grown < 1.3 * n_bytes, f"loading grew RSS by {grown / 1e6:.0f} MB for a {n_bytes / 1e6:.0f} MB model: {out}"


# ---------------------------------------------------------------------------- module shape
@pytest.mark.parametrize(
    "options",
    [
        {"flavour": "kimi"},
        {"flavour": "cumulative", "routing_mode": "full", "tie_word_embeddings": True},
        {"flavour": "kimi", "n_heads": 6, "d_head": 4, "n_key_value_heads": 2, "d_mlp": 40},
    ],
)
def test_checkpoint_shapes_are_the_shapes_of_the_model_parameters(options):
    """Loading checks tensor shapes against the config without building the model: the shapes
    it derives must be exactly the model's parameter shapes, key for key."""
    from attnres_lens.loading import checkpoint_shapes, key_map

    cfg = al.AttnResConfig(**{"d_model": 32, "d_head": 8, "n_layers": 3, "d_vocab": 50, "n_blocks": 2, **options})
    params = dict(HookedAttnResTransformer(cfg).named_parameters(remove_duplicate=False))
    ours = key_map(cfg, with_routers=True)
    shapes = checkpoint_shapes(cfg, with_routers=True)
    assert set(shapes) == set(ours)
    assert {ours[key]: shape for key, shape in shapes.items()} == {
        name: tuple(p.shape) for name, p in params.items() if name in ours.values()
    }


def test_loading_never_imports_the_model():
    script = (
        "import sys, attnres_lens.loading as loading; "
        "assert 'attnres_lens.model' not in sys.modules, sorted(sys.modules); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_read_checkpoint_gives_config_format_state_and_tokenizer(tmp_path, base):
    from attnres_lens.loading import read_checkpoint

    write_attnres_checkpoint(tmp_path, base, "cumulative", n_blocks=2, mode="block")
    checkpoint = read_checkpoint(tmp_path)
    assert checkpoint.format.name == "qwen3_attnres/cumulative"
    assert (checkpoint.config.flavour, checkpoint.config.n_blocks) == ("cumulative", 2)
    assert isinstance(checkpoint.tokenizer, al.ByteTokenizer)
    model = checkpoint.into(HookedAttnResTransformer)
    assert set(checkpoint.state) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert tensor.data_ptr() == checkpoint.state[name].data_ptr()  # given, not copied


# ---------------------------------------------------------------------------- block counts (issue K 3)
def test_n_blocks_is_the_count_actually_built_with_a_warning():
    with pytest.warns(UserWarning, match=r"n_blocks=3 with n_layers=4 builds 2 blocks of 2 layer"):
        cfg = al.AttnResConfig(d_model=32, d_head=8, n_layers=4, n_blocks=3)
    assert (cfg.n_blocks, cfg.layers_per_block) == (2, 2)
    model = HookedAttnResTransformer(cfg)
    assert len({cfg.block_of_layer(layer) for layer in range(cfg.n_layers)}) == cfg.n_blocks
    # the final router reads the embedding, block 0 and the partial sum of block 1
    assert [src.family for src in model.router_specs[-1].sources] == ["embedding", "history", "current"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a count that is built as asked says nothing
        assert al.AttnResConfig(d_model=32, d_head=8, n_layers=5, n_blocks=3).n_blocks == 3


def test_inspect_prints_the_effective_block_count(tmp_path, capsys):
    from attnres_lens.cli import main

    with pytest.warns(UserWarning, match="builds 2 blocks"):
        model = HookedAttnResTransformer(al.AttnResConfig(d_model=32, d_head=8, n_layers=4, n_blocks=3))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["attnres_num_blocks"] == 2
    assert main(["inspect", str(tmp_path)]) == 0
    assert "2 blocks of 2 layer(s)" in capsys.readouterr().out


@pytest.mark.parametrize("flavour", ["cumulative", "kimi"])
def test_more_blocks_than_layers_loads_as_one_block_per_layer(tmp_path, base, flavour):
    write_attnres_checkpoint(tmp_path / "wild", base, flavour, n_blocks=9)  # base has 5 layers
    write_attnres_checkpoint(tmp_path / "per_layer", base, flavour, n_blocks=5)
    with pytest.warns(UserWarning, match="asks for 9 blocks but has 5 layers.*n_blocks=5"):
        wild = HookedAttnResTransformer.from_pretrained(tmp_path / "wild")
    same = HookedAttnResTransformer.from_pretrained(tmp_path / "per_layer")
    assert (wild.cfg.n_blocks, wild.cfg.layers_per_block) == (5, 1)
    assert torch.equal(wild(TOKENS), same(TOKENS))
    config, state = load_checkpoint_state(tmp_path / "wild")
    ref_logits, _ = reference_logits(config, state, TOKENS, flavour, "block")
    assert (wild(TOKENS) - ref_logits).abs().max().item() < 1e-4


# ---------------------------------------------------------------------------- tokenizer (issue K 1)
def test_a_real_vocabulary_without_tokenizer_files_gets_no_byte_tokenizer(tmp_path):
    from attnres_lens.loading import NoTokenizer

    hf = tiny_qwen3(seed=2, vocab=1000, n_layers=2)
    model = HookedAttnResTransformer.from_pretrained(hf, flavour="kimi")
    assert isinstance(model.tokenizer, NoTokenizer)
    tokens = torch.randint(0, 1000, (1, 6))
    assert model(tokens).shape == (1, 6, 1000)  # token ids still work
    with pytest.raises(ValueError, match=r"vocabulary of 1,000 tokens .*tokenizer=.*--tokenizer DIR"):
        model.to_tokens("hello")
    with pytest.raises(ValueError, match="no tokenizer"):
        model.to_string(tokens[0])
    model.save_pretrained(tmp_path)
    assert isinstance(HookedAttnResTransformer.from_pretrained(tmp_path).tokenizer, NoTokenizer)
    given = HookedAttnResTransformer.from_pretrained(hf, flavour="kimi", tokenizer=al.ByteTokenizer())
    assert given.to_tokens("hi").tolist() == [[104, 105]]  # what the caller asked for is used


def test_a_byte_sized_vocabulary_keeps_the_byte_tokenizer(base):
    assert isinstance(HookedAttnResTransformer.from_pretrained(base, flavour="kimi").tokenizer, al.ByteTokenizer)


# ---------------------------------------------------------------------------- file modes (issue K 16)
@pytest.mark.parametrize("umask", [0o022, 0o077])
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_saved_weights_have_the_mode_of_the_other_files(tmp_path, umask, shard):
    import os

    model = HookedAttnResTransformer(al.AttnResConfig(d_model=32, d_head=8, n_layers=2))
    previous = os.umask(umask)
    try:
        model.save_pretrained(tmp_path, max_shard_size=shard)
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert len(modes) >= 2 and set(modes.values()) == {0o666 & ~umask}, {k: oct(v) for k, v in modes.items()}
