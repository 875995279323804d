"""Test helpers: tiny checkpoints of every format and an independent reference of the spec.

``reference_logits`` is a deliberately plain re-implementation of ``shared/spec/attnres.md``
that works on a raw Hugging Face-keyed state dict. It shares no code with the library: it is
what the library's logits are checked against.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

# ---------------------------------------------------------------------------- builders


def tiny_qwen3(
    *,
    seed: int = 0,
    vocab: int = 300,
    d_model: int = 64,
    n_layers: int = 5,
    n_heads: int = 4,
    n_kv: int = 2,
    head_dim: int = 24,
    d_mlp: int = 96,
    tied: bool = False,
    eps: float = 1e-6,
    rope_theta: float = 10000.0,
) -> Qwen3ForCausalLM:
    """A random Qwen3 with realistic activation scale: embeddings of std 1, norm gains not 1."""
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab,
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        rms_norm_eps=eps,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def tiny_attnres(
    flavour: str = "kimi", routing_mode: str = "block", n_layers: int = 4, n_blocks: int = 2, seed: int = 0, **cfg
):
    """A fresh tiny HookedAttnResTransformer whose routers are randomised (query std 0.3, key
    gains around 1, biases N(0, 1)), so that routing depends on content and no weight is
    uniform. ``cfg`` overrides AttnResConfig fields (default d_model 32, d_head 8, vocab 300)."""
    from attnres_lens import AttnResConfig, HookedAttnResTransformer, RoutingSchedule

    torch.manual_seed(seed)
    fields = dict(d_model=32, d_head=8, d_vocab=300)
    fields.update(cfg)
    model = HookedAttnResTransformer(
        AttnResConfig(n_layers=n_layers, n_blocks=n_blocks, flavour=flavour, routing_mode=routing_mode, **fields)
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, router in model.routers():
            router.proj.weight.copy_(torch.randn(router.proj.weight.shape, generator=gen) * 0.3)
            router.norm.weight.copy_(torch.rand(router.norm.weight.shape, generator=gen) + 0.5)
            if router.bias is not None:
                router.bias.copy_(torch.randn((), generator=gen))
    model.schedule = RoutingSchedule()
    return model


def router_tensors(
    hf_config: dict, flavour: str, *, seed: int = 1, query_std: float = 0.3, bias_scale: float = 2.0
) -> dict[str, torch.Tensor]:
    """Router weights in the spec's key layout, non-zero so routing depends on content."""
    gen = torch.Generator().manual_seed(seed)
    d = hf_config["hidden_size"]
    out = {}

    def router(prefix: str, with_bias: bool) -> None:
        out[f"{prefix}_res_proj.weight"] = torch.randn(1, d, generator=gen) * query_std
        out[f"{prefix}_res_norm.weight"] = torch.rand(d, generator=gen) + 0.5
        if with_bias:
            out[f"{prefix}_res_bias"] = torch.randn((), generator=gen) * bias_scale

    for layer in range(hf_config["num_hidden_layers"]):
        router(f"model.layers.{layer}.attn", flavour == "cumulative")
        router(f"model.layers.{layer}.mlp", flavour == "cumulative")
    if flavour == "kimi":
        router("model.final", False)
    return out


def write_attnres_checkpoint(
    directory: Path,
    base: Qwen3ForCausalLM,
    flavour: str,
    *,
    n_blocks: int,
    mode: str = "block",
    seed: int = 1,
    extra_config: Optional[dict] = None,
) -> Path:
    """A ``qwen3_attnres`` checkpoint as the public codebases lay it out: the Qwen3 weights of
    ``base`` plus router keys, and the attnres_* config fields."""
    directory = Path(directory)
    base.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    state = load_file(str(directory / "model.safetensors"))
    state.update(router_tensors(config, flavour, seed=seed))
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config.update(
        model_type="qwen3_attnres",
        architectures=["Qwen3AttnResForCausalLM"],
        attnres_num_blocks=n_blocks,
        attnres_mode=mode,
        attnres_gate_type="bias",
    )
    if flavour == "cumulative":
        config["attnres_recency_bias_init"] = 3.0
    config.update(extra_config or {})
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def load_checkpoint_state(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    return config, load_file(str(directory / "model.safetensors"))


# ---------------------------------------------------------------------------- reference


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    dim = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
    ang = torch.arange(pos).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    half = dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + rotated * sin[:, None]  # x: [batch, pos, head, dim]


def _attention(sd: dict, pre: str, h: torch.Tensor, c: dict) -> torch.Tensor:
    b, t, _ = h.shape
    nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]
    dh = c.get("head_dim") or c["hidden_size"] // nh
    theta = (c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 10000.0))
    eps = c["rms_norm_eps"]
    x = _rms(h, sd[f"{pre}.input_layernorm.weight"], eps)
    q = (x @ sd[f"{pre}.self_attn.q_proj.weight"].T).view(b, t, nh, dh)
    k = (x @ sd[f"{pre}.self_attn.k_proj.weight"].T).view(b, t, nkv, dh)
    v = (x @ sd[f"{pre}.self_attn.v_proj.weight"].T).view(b, t, nkv, dh)
    q = _rotate(_rms(q, sd[f"{pre}.self_attn.q_norm.weight"], eps), t, theta)
    k = _rotate(_rms(k, sd[f"{pre}.self_attn.k_norm.weight"], eps), t, theta)
    out = torch.zeros(b, t, nh, dh)
    for head in range(nh):
        kv = head // (nh // nkv)
        scores = torch.einsum("bqd,bkd->bqk", q[:, :, head], k[:, :, kv]) / math.sqrt(dh)
        scores = scores.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
        out[:, :, head] = torch.einsum("bqk,bkd->bqd", scores.softmax(-1), v[:, :, kv])
    return out.reshape(b, t, nh * dh) @ sd[f"{pre}.self_attn.o_proj.weight"].T


def _mlp(sd: dict, pre: str, h: torch.Tensor, c: dict) -> torch.Tensor:
    x = _rms(h, sd[f"{pre}.post_attention_layernorm.weight"], c["rms_norm_eps"])
    gate = x @ sd[f"{pre}.mlp.gate_proj.weight"].T
    up = x @ sd[f"{pre}.mlp.up_proj.weight"].T
    return (torch.nn.functional.silu(gate) * up) @ sd[f"{pre}.mlp.down_proj.weight"].T


def _route(sources: list, sd: dict, prefix: str, eps: float, weights_out: list) -> torch.Tensor:
    V = torch.stack(sources, dim=2)
    logits = _rms(V, sd[f"{prefix}_res_norm.weight"], eps) @ sd[f"{prefix}_res_proj.weight"][0]
    if f"{prefix}_res_bias" in sd:
        bias = torch.zeros(len(sources))
        bias[-1] = sd[f"{prefix}_res_bias"]
        logits = logits + bias
    alpha = logits.softmax(-1)
    weights_out.append(alpha)
    return (alpha[..., None] * V).sum(2)


def reference_logits(
    config: dict, sd: dict, tokens: torch.Tensor, flavour: str, mode: str = "block"
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and the routing weights of every router, in forward order, per the spec."""
    sd = {k: v.float() for k, v in sd.items()}
    L, N, eps = config["num_hidden_layers"], config["attnres_num_blocks"], config["rms_norm_eps"]
    P = max(1, math.ceil(L / N))
    emb = sd["model.embed_tokens.weight"][tokens]
    weights: list = []
    attn = lambda l, h: _attention(sd, f"model.layers.{l}", h, config)  # noqa: E731
    mlp = lambda l, h: _mlp(sd, f"model.layers.{l}", h, config)  # noqa: E731
    route = lambda srcs, prefix: _route(srcs, sd, prefix, eps, weights)  # noqa: E731
    if flavour == "kimi" and mode == "block":
        B, p = [], emb
        for l in range(L):
            h = route([*B, p], f"model.layers.{l}.attn")
            if l % P == 0:
                B.append(p)
                p = torch.zeros_like(emb)
            p = p + attn(l, h)
            h = route([*B, p], f"model.layers.{l}.mlp")
            p = p + mlp(l, h)
        y = route([*B, p], "model.final")
    elif flavour == "kimi":  # full: sublayer k routes over [embedding, out_0, ..., out_{k-1}]
        outs = [emb]
        for l in range(L):
            outs.append(attn(l, route(list(outs), f"model.layers.{l}.attn")))
            outs.append(mlp(l, route(list(outs), f"model.layers.{l}.mlp")))
        y = route(outs, "model.final")
    else:
        H, x = [emb], emb
        for l in range(L):
            x = x + attn(l, route([*H, x], f"model.layers.{l}.attn"))
            if mode == "full":
                H.append(x)
            x = x + mlp(l, route([*H, x], f"model.layers.{l}.mlp"))
            if mode == "full" or (l + 1) % P == 0:
                H.append(x)
        y = x
    head = sd["model.embed_tokens.weight"] if config.get("tie_word_embeddings") else sd["lm_head.weight"]
    return _rms(y, sd["model.norm.weight"], eps) @ head.T, weights
