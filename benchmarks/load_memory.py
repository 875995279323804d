"""Peak memory of loading a Qwen3-0.6B-shaped checkpoint, relative to the loaded model's size.

Writes a sharded bf16 safetensors checkpoint with Qwen3-0.6B's shapes (28 layers, d_model 1024,
vocab 151936, tied head; ~1.2 GB) to a temporary directory, loads it in a fresh process with
``HookedAttnResTransformer.from_pretrained`` (kimi wrap) in bf16 and in fp32, and prints the
growth of the process's peak RSS (VmHWM) divided by the size of the loaded model. Target: about
2 or less.

    python benchmarks/load_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}


def shapes() -> dict[str, tuple[int, ...]]:
    c = CONFIG
    d, f, dh = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * dh, c["num_key_value_heads"] * dh
    out = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,)}
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
            p + "self_attn.q_norm.weight": (dh,), p + "self_attn.k_norm.weight": (dh,),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f),
        })
    return out


def write_checkpoint(directory: Path, shard_bytes: int = 400_000_000) -> int:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, total = 0, 0
    for key, shape in shapes().items():
        tensor = torch.full(shape, 0.01, dtype=torch.bfloat16)
        if size + tensor.nbytes > shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += tensor.nbytes
        total += tensor.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (directory / "config.json").write_text(json.dumps(CONFIG))
    return total


MEASURE = """
import sys, torch, transformers, safetensors, huggingface_hub, attnres_lens.loading
def status(field):
    line = next(l for l in open('/proc/self/status') if l.startswith(field + ':'))
    return int(line.split()[1]) * 1024
before = status('VmRSS')
model = attnres_lens.HookedAttnResTransformer.from_pretrained(sys.argv[1], flavour='kimi', dtype=sys.argv[2])
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(size, status('VmHWM') - before)
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        total = write_checkpoint(Path(tmp))
        print(f"checkpoint: {total / 1e9:.2f} GB bf16 (Qwen3-0.6B shapes, sharded)")
        for dtype in ("bfloat16", "float32"):
            out = subprocess.run([sys.executable, "-c", MEASURE, tmp, dtype], capture_output=True, text=True, check=True)
            size, grown = map(int, out.stdout.split()[-2:])
            print(f"  load as {dtype:<9} model {size / 1e9:.2f} GB, peak RSS growth {grown / 1e9:.2f} GB, "
                  f"ratio {grown / size:.2f}  (target <= ~2)")


if __name__ == "__main__":
    main()
