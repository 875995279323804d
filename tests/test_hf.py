"""attnres_lens.hf: the Hugging Face-native classes load every layout with no remote code, compute
what HookedAttnResTransformer computes (it is their one implementation), and save bit for bit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference import tiny_attnres, tiny_qwen3, write_attnres_checkpoint
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from attnres_lens import HookedAttnResTransformer, RoutingSchedule
from attnres_lens.hf import Qwen3AttnResConfig, Qwen3AttnResForCausalLM

TOKENS = torch.tensor([[5, 17, 200, 3, 99, 41, 7, 250, 12], [9, 1, 4, 150, 22, 8, 30, 70, 2]])


@pytest.fixture(scope="module")
def base():
    return tiny_qwen3(seed=0, n_layers=5)


def _external(tmp_path: Path, base, flavour: str, mode: str = "block") -> Path:
    return write_attnres_checkpoint(tmp_path / f"{flavour}-{mode}", base, flavour, n_blocks=2, mode=mode)


def _ours_saved(tmp_path: Path, flavour: str, **save) -> Path:
    model = tiny_attnres(flavour, n_layers=4, n_blocks=2, seed=3)
    if flavour == "cumulative":
        model.schedule = RoutingSchedule("recency", 2.0)  # metadata that must survive the trip
    return model.save_pretrained(tmp_path / f"ours-{flavour}", **save)


def _layouts(tmp_path: Path, base) -> dict[str, Path]:
    return {
        "kimi": _external(tmp_path, base, "kimi"),
        "cumulative": _external(tmp_path, base, "cumulative"),
        "cumulative-full": _external(tmp_path, base, "cumulative", "full"),
        "ours-kimi-sharded": _ours_saved(tmp_path, "kimi", max_shard_size="20KB"),
        "ours-cumulative": _ours_saved(tmp_path, "cumulative"),
    }


def test_auto_classes_load_every_layout_with_our_logits_and_routing(tmp_path, base):
    for name, directory in _layouts(tmp_path, base).items():
        config = AutoConfig.from_pretrained(directory)
        assert isinstance(config, Qwen3AttnResConfig), name
        hf = AutoModelForCausalLM.from_pretrained(directory)  # no trust_remote_code
        assert type(hf) is Qwen3AttnResForCausalLM, name
        ours = HookedAttnResTransformer.from_pretrained(directory)
        assert hf.config.attnres_flavour == ours.cfg.flavour
        _, cache = ours.run_with_cache(TOKENS)
        with torch.no_grad():
            logits = hf(TOKENS).logits
            mass = hf.routing_mass(TOKENS)
        assert (logits - ours(TOKENS)).abs().max() <= 1e-5, name
        assert list(mass) == [spec.name for spec in ours.router_specs]
        for router, weights in mass.items():
            assert (weights - cache[f"{router}.hook_weights"]).abs().max() <= 1e-5, (name, router)


def test_save_pretrained_round_trips_bit_for_bit(tmp_path, base):
    for name, directory in _layouts(tmp_path, base).items():
        hf = AutoModelForCausalLM.from_pretrained(directory)
        hf.save_pretrained(tmp_path / "again" / name)
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "again" / name)
        original, written = hf.checkpoint_state(), again.checkpoint_state()
        assert original.keys() == written.keys()
        assert all(torch.equal(original[k], written[k]) for k in original), name
        files = {}
        for path in (tmp_path / "again" / name).glob("*.safetensors"):
            files.update(load_file(str(path)))
        assert files.keys() == original.keys() and all(torch.equal(files[k], original[k]) for k in files)
        config = json.loads((tmp_path / "again" / name / "config.json").read_text())
        assert config["architectures"] == ["Qwen3AttnResForCausalLM"]
        assert config["model_type"] == "qwen3_attnres"
        assert again.model.schedule == hf.model.schedule


def test_labels_give_the_hugging_face_causal_loss(tmp_path, base):
    hf = AutoModelForCausalLM.from_pretrained(_external(tmp_path, base, "kimi"))
    labels = TOKENS.clone()
    labels[0, :3] = -100  # ignored, as in every transformers causal LM
    with torch.no_grad():
        out = hf(TOKENS, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    expected = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    with torch.no_grad():
        plain = hf(TOKENS, labels=TOKENS).loss
    assert plain.item() == pytest.approx(hf.model(TOKENS, return_type="loss").item(), abs=1e-6)


def test_generate_and_attentions_match_our_model(tmp_path, base):
    for flavour in ("kimi", "cumulative"):
        hf = AutoModelForCausalLM.from_pretrained(_external(tmp_path, base, flavour))
        greedy = hf.generate(TOKENS[:1, :4], max_new_tokens=6, do_sample=False)
        ours = hf.model.generate(TOKENS[:1, :4], max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False)
        assert torch.equal(greedy, ours)
        with torch.no_grad():
            out = hf(TOKENS, output_attentions=True)
        _, cache = hf.model.run_with_cache(TOKENS)
        assert len(out.attentions) == hf.model.cfg.n_layers
        for layer, pattern in enumerate(out.attentions):
            assert (pattern - cache[f"blocks.{layer}.attn.hook_pattern"]).abs().max() <= 1e-6


def test_padding_matches_the_unpadded_rows(tmp_path, base):
    hf = AutoModelForCausalLM.from_pretrained(_external(tmp_path, base, "cumulative"))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), TOKENS[:1]], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, TOKENS.shape[1], dtype=torch.long)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        left = hf(padded, attention_mask=mask, position_ids=positions).logits[:, 3:]
        alone = hf(TOKENS[:1]).logits
    assert (left - alone).abs().max() <= 1e-5


def test_conversion_both_ways(tmp_path, base):
    ours = HookedAttnResTransformer.from_pretrained(_ours_saved(tmp_path, "cumulative"))
    wrapped = Qwen3AttnResForCausalLM.from_attnres_model(ours)  # shares every tensor
    assert wrapped.model is ours
    assert wrapped.config.attnres_flavour == "cumulative"
    copied = HookedAttnResTransformer.from_pretrained(wrapped)  # reads the HF-native model in memory
    assert copied.schedule == ours.schedule
    assert torch.equal(copied(TOKENS), ours(TOKENS))
    shared = {p.data_ptr() for p in ours.parameters()}
    assert not shared & {p.data_ptr() for p in copied.parameters()}  # a copy: the user's model is never changed


def test_a_fresh_model_from_a_config_initialises_like_ours():
    config = Qwen3AttnResConfig(
        vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, attnres_num_blocks=2, attnres_flavour="cumulative",
        attnres_recency_bias_init=3.0,
    )
    hf = Qwen3AttnResForCausalLM(config)
    for _, router in hf.model.routers():
        assert torch.count_nonzero(router.proj.weight) == 0  # zero queries (Kimi report)
        assert router.bias.item() == 3.0
    with pytest.raises(ValueError, match="attnres_flavour"):
        Qwen3AttnResForCausalLM(Qwen3AttnResConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4))


def test_a_callers_config_is_kept_when_it_describes_the_checkpoint(tmp_path, base):
    directory = _external(tmp_path, base, "kimi")
    config = AutoConfig.from_pretrained(directory, output_attentions=True)  # as TransformerLens 4 asks
    hf = AutoModelForCausalLM.from_pretrained(directory, config=config)
    assert hf.config.output_attentions and hf.config.attnres_flavour == "kimi"
    with torch.no_grad():
        assert hf(TOKENS).attentions is not None
    config.num_hidden_layers = 4
    with pytest.raises(ValueError, match="n_layers"):
        AutoModelForCausalLM.from_pretrained(directory, config=config)
    config = AutoConfig.from_pretrained(directory)
    config.attnres_flavour = "cumulative"
    with pytest.raises(ValueError, match="flavour='cumulative' was asked for"):
        AutoModelForCausalLM.from_pretrained(directory, config=config)


def test_bad_arguments_are_refused_by_name(tmp_path, base):
    directory = _external(tmp_path, base, "kimi")
    with pytest.raises(TypeError, match="output_loading_info"):
        Qwen3AttnResForCausalLM.from_pretrained(directory, output_loading_info=True)
    with pytest.raises(ValueError, match="device_map"):
        Qwen3AttnResForCausalLM.from_pretrained(directory, device_map={"model.blocks.0": "cpu", "model.blocks.1": "cuda:0"})
    assert Qwen3AttnResForCausalLM.from_pretrained(directory, device_map={"": "cpu"}).device == torch.device("cpu")
    with pytest.raises(ValueError, match="flash_attention_2"):
        Qwen3AttnResForCausalLM.from_pretrained(directory, attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="dtype must be one of"):
        Qwen3AttnResForCausalLM.from_pretrained(directory, dtype="int8")
    hf = Qwen3AttnResForCausalLM.from_pretrained(directory, dtype="auto")
    assert hf.dtype == torch.float32
    with pytest.raises(ValueError, match="single residual"):
        hf(TOKENS, output_hidden_states=True)
    with pytest.raises(ValueError, match="inputs_embeds"):
        hf(inputs_embeds=torch.zeros(1, 3, 64))
    with pytest.raises(ValueError, match="position_ids"):
        hf(TOKENS, position_ids=torch.arange(TOKENS.shape[1]) + 5)
    with pytest.raises(TypeError, match="safe_serialization"):
        hf.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert not (tmp_path / "bin").exists()


def test_bfloat16_loads_as_asked(tmp_path, base):
    hf = AutoModelForCausalLM.from_pretrained(_external(tmp_path, base, "cumulative"), dtype=torch.bfloat16)
    assert hf.dtype == torch.bfloat16 and hf.model.cfg.dtype == torch.bfloat16
    with torch.no_grad():
        assert hf(TOKENS).logits.dtype == torch.bfloat16


def test_importing_attnres_lens_registers_before_or_after_transformers(tmp_path, base):
    directory = _external(tmp_path, base, "cumulative")
    load = f"m = AutoModelForCausalLM.from_pretrained({str(directory)!r}); print(type(m).__name__)"
    orders = {  # test_package checks that ``import attnres_lens`` alone imports no transformers
        "transformers first": "from transformers import AutoModelForCausalLM\nimport attnres_lens\n",
        # transformer_lens imports transformers while attnres_lens.model is still being imported
        "during our own import": "import attnres_lens\nattnres_lens.HookedAttnResTransformer\n"
        "from transformers import AutoModelForCausalLM\n",
    }
    for order, imports in orders.items():
        run = subprocess.run(
            [sys.executable, "-W", "error::RuntimeWarning", "-c", imports + load],
            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        assert run.returncode == 0, (order, run.stderr[-2000:])
        assert run.stdout.strip().endswith("Qwen3AttnResForCausalLM"), order
