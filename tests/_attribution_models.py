"""Tiny models with a causal structure known by construction, for the attribution tests.

Everything goes through the public API: an :class:`AttnResConfig`, a fresh
:class:`HookedAttnResTransformer`, and ``load_state_dict`` of hand-set weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from attnres_lens import AttnResConfig, HookedAttnResTransformer


@dataclass
class Planted:
    """A planted model, its data, and what is true of it by construction."""

    model: HookedAttnResTransformer
    tokens: Tensor
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


def random_model(
    flavour: str = "kimi", routing_mode: str = "block", n_layers: int = 2, seed: int = 0, query_scale: float = 0.5,
    **kw,
) -> HookedAttnResTransformer:
    """A small model with random weights and random (nonzero) router queries."""
    torch.manual_seed(seed)
    fields = dict(d_model=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=64, n_ctx=64, initializer_range=0.2)
    fields.update(kw)
    cfg = AttnResConfig(n_layers=n_layers, flavour=flavour, routing_mode=routing_mode, **fields)
    model = HookedAttnResTransformer(cfg)
    with torch.no_grad():
        for spec, router in model.routers():
            router.proj.weight.normal_(0.0, query_scale)
    return model
