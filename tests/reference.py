"""Test helpers: tiny checkpoints of every format and an independent reference of the spec.

``reference_logits`` is a deliberately plain re-implementation of the model stated in
``docs/concepts.md`` that works on a raw Hugging Face-keyed state dict. It shares no code with the library: it is
what the library's logits are checked against.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
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
    flavour: str = "kimi",
    routing_mode: str = "block",
    n_layers: int = 4,
    n_blocks: Optional[int] = 2,
    seed: int = 0,
    *,
    routers: str = "random",
    query_scale: float = 0.3,
    **cfg,
):
    """The one builder of tiny random HookedAttnResTransformers, seeded by ``seed``.

    ``routers="random"``: every router part is redrawn from a generator seeded with ``seed``
    (query std ``query_scale``, key gains around 1, biases N(0, 1)), so that routing depends on
    content and no weight is uniform; ``cfg`` defaults to d_model 32, d_head 8, vocab 300.
    ``routers="queries"``: only the queries are redrawn, N(0, ``query_scale``) from torch's
    global generator after ``torch.manual_seed(seed)`` (keys and biases keep their
    initialisation). ``n_blocks=None`` leaves AttnResConfig's default; ``cfg`` overrides any
    other AttnResConfig field."""
    from attnres_lens import AttnResConfig, HookedAttnResTransformer, RoutingSchedule

    if routers not in ("random", "queries"):
        raise ValueError(f"routers must be 'random' or 'queries', got {routers!r}")
    torch.manual_seed(seed)
    fields = dict(d_model=32, d_head=8, d_vocab=300)
    fields.update(cfg)
    if n_blocks is not None:
        fields["n_blocks"] = n_blocks
    model = HookedAttnResTransformer(
        AttnResConfig(n_layers=n_layers, flavour=flavour, routing_mode=routing_mode, **fields)
    )
    with torch.no_grad():
        if routers == "queries":
            for _, router in model.routers():
                router.proj.weight.normal_(0.0, query_scale)
            return model
        gen = torch.Generator().manual_seed(seed)
        for _, router in model.routers():
            router.proj.weight.copy_(torch.randn(router.proj.weight.shape, generator=gen) * query_scale)
            router.norm.weight.copy_(torch.rand(router.norm.weight.shape, generator=gen) + 0.5)
            if router.bias is not None:
                router.bias.copy_(torch.randn((), generator=gen))
    model.schedule = RoutingSchedule()
    return model


def no_hooks_left(model) -> bool:
    """No hook point of ``model`` holds a forward or backward hook."""
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


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


# ---------------------------------------------------------------------------- planted models
@dataclass
class Planted:
    """A planted model, its data, and what is true of it by construction."""

    model: Any  # a HookedAttnResTransformer
    tokens: torch.Tensor
    #: (router, source) of the large-mass slice whose contribution every reader removes
    dead: tuple[str, int]
    #: (router, source) of the small-mass slice that carries what the output needs
    vital: tuple[str, int]
    mass_dead: float
    mass_vital: float


def planted_kimi(seed: int, n_prompts: int = 16, n_pos: int = 12, noise: float = 0.25) -> Planted:
    """A one-layer kimi model in full mode; its final router reads [emb, attn 0, mlp 0].

    - The embedding carries the token's identity in V "info" coordinates (scale ``A``) plus a
      constant "bias" coordinate. The unembedding predicts ``f(t)`` from the info coordinates
      only; the data follow ``t -> f(t)`` except for a fraction ``noise`` of random tokens.
    - Attention writes nothing (``o_proj = 0``): source "attn 0" is the zero vector.
    - The MLP reads the constant bias coordinate and writes a small constant ``M e_z`` along a
      coordinate ``z`` that the final norm's gain zeroes out and the unembedding ignores.
    - The final router's query points along ``z``, so it puts mass ``alpha_dead`` (0.92..0.97)
      on "mlp 0" and ``(1 - alpha_dead) / 2`` (< 0.04) on each of "emb" and "attn 0".

    So "mlp 0" at the final router has large mass and (up to its share of the final RMS,
    ``(alpha_dead M)^2`` against ``(alpha_emb A)^2``, about 1e-5 here) no effect; "emb" there
    has small mass and removing it destroys the prediction (loss -> ln V)."""
    from attnres_lens import AttnResConfig, HookedAttnResTransformer

    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    V, d = 16, 32
    cfg = AttnResConfig(
        d_model=d, d_head=8, n_heads=2, d_mlp=8, n_layers=1, d_vocab=V, n_ctx=64,
        flavour="kimi", routing_mode="full",
    )
    model = HookedAttnResTransformer(cfg)
    perm = torch.randperm(d, generator=gen)
    info, bias_c, z = perm[:V], int(perm[V]), int(perm[V + 1])
    A = float(rng.uniform(60.0, 120.0))
    c = 1.0
    M = float(rng.uniform(0.01, 0.03))
    alpha_dead = float(rng.uniform(0.92, 0.97))
    f = torch.randperm(V, generator=gen)  # next token = f[t]
    beta = float(rng.uniform(0.9, 1.2))

    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for spec in model.router_specs:  # every query zero unless set below (a uniform router)
        sd[f"{spec.name}.proj.weight"] = torch.zeros(1, d)
    emb = torch.zeros(V, d)
    emb[torch.arange(V), info] = A
    emb[:, bias_c] = c
    sd["embed.weight"] = emb
    sd["blocks.0.attn.o_proj.weight"].zero_()
    # MLP: a constant output M e_z, computed from the (constant) normalised bias coordinate.
    kappa = c / math.sqrt((A * A + c * c) / d)  # ln2(h)[bias] for h = emb / 2 (mlp router: 1/2, 1/2)
    gamma = 2.0
    gate = torch.zeros(cfg.d_mlp, d)
    gate[0, bias_c] = gamma
    up = torch.zeros(cfg.d_mlp, d)
    up[0, bias_c] = gamma
    mu = float(torch.nn.functional.silu(torch.tensor(gamma * kappa)) * gamma * kappa)
    down = torch.zeros(d, cfg.d_mlp)
    down[z, 0] = M / mu
    sd["blocks.0.mlp.gate_proj.weight"] = gate
    sd["blocks.0.mlp.up_proj.weight"] = up
    sd["blocks.0.mlp.down_proj.weight"] = down
    # Final router: logit(mlp 0) = s * key_z (its key is RMSNorm(M e_z) = key_z e_z), others 0.
    key_z = M / math.sqrt(M * M / d + cfg.eps)
    s = math.log(2 * alpha_dead / (1 - alpha_dead)) / key_z
    q = torch.zeros(1, d)
    q[0, z] = s
    sd["final_router.proj.weight"] = q
    # Readers: the final norm keeps only the info coordinates; the head maps info(t) -> f(t).
    g = torch.zeros(d)
    g[info] = 1.0
    sd["ln_final.weight"] = g
    W_U = torch.zeros(V, d)
    W_U[f, info] = beta
    sd["unembed.weight"] = W_U
    model.load_state_dict(sd)

    tokens = torch.empty(n_prompts, n_pos, dtype=torch.long)
    tokens[:, 0] = torch.randint(V, (n_prompts,), generator=gen)
    for p in range(1, n_pos):
        follow = f[tokens[:, p - 1]]
        rand = torch.randint(V, (n_prompts,), generator=gen)
        keep = torch.rand(n_prompts, generator=gen) >= noise
        tokens[:, p] = torch.where(keep, follow, rand)
    names = [src.label for src in model.router_specs[-1].sources]
    return Planted(
        model=model,
        tokens=tokens,
        dead=("final_router", names.index("mlp 0")),
        vital=("final_router", names.index("emb")),
        mass_dead=alpha_dead,
        mass_vital=(1 - alpha_dead) / 2,
    )
