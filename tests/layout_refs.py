"""Independent references of the public AttnRes layouts, and fixture generators that write them.

Each reference re-implements one public repository's forward, written from reading its code (the
file and commit are cited at each function), in plain torch over Hugging Face's own Qwen3 modules
(the backbone's ground truth). None of it imports the library. Each generator builds a tiny random
model with non-zero router queries (zero queries would make routing uniform and hide layout
mistakes) and writes a checkpoint directory with that project's config fields and key names.

Routing weights are returned per router in forward order (attn 0, mlp 0, attn 1, ..., final) as
``[batch, pos, source]`` (``[batch, pos, head, source]`` for per-head routing), the library's
hook layout; the public code keeps them as ``[source, batch, pos]``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3ForCausalLM

from reference import tiny_qwen3

# ------------------------------------------------------------------------ the routing kernels
def _rms(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    # Qwen3RMSNorm (transformers), as the public AttnRes code builds its key norms.
    x32 = x.float()
    return gain * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))


def route(sources, query, gain, eps, bias=None, weights_out=None):
    """DELTA ``block_attn_res`` (DELTA 143-152, 190-212); with ``bias`` OPEN's (OPEN 145-185),
    which adds the scalar bias to the LAST source's logit (OPEN 171)."""
    V = torch.stack(sources, dim=0)  # [S, B, T, D]
    logits = torch.einsum("d,nbtd->nbt", query.view(-1), _rms(V, gain, eps))
    if bias is not None:
        logits = torch.cat([logits[:-1], logits[-1:] + bias])
    weights = logits.softmax(dim=0)
    if weights_out is not None:
        weights_out.append(weights.permute(1, 2, 0))
    return torch.einsum("nbt,nbtd->btd", weights, V)


def route_per_head(sources, query, gain, eps, heads, weights_out=None):
    """MHAR ``_mh_block_attn_res_kernel`` (Zimmer061310/multi-head-attention-residuals-test-stuff
    @49410f1, src/attention_residuals/modeling_qwen3_attnres.py): keys normed over all of
    d_model, then per head h over channels [h D/H, (h+1) D/H) a logit <q_h, K_h>, a softmax over
    the sources per head, and each head's channels mixed with its own weights."""
    V = torch.stack(sources, dim=0)
    S, B, T, D = V.shape
    K = _rms(V, gain, eps).view(S, B, T, heads, D // heads)
    q = query.view(heads, D // heads)
    weights = torch.einsum("hc,nbthc->nbth", q, K).softmax(dim=0)
    if weights_out is not None:
        weights_out.append(weights.permute(1, 2, 3, 0))
    out = torch.einsum("nbth,nbthc->bthc", weights, V.view(S, B, T, heads, D // heads))
    return out.reshape(B, T, D)


# ------------------------------------------------------------------------ Qwen3 sublayers (HF)
class _Qwen3:
    """The sublayers of a Hugging Face ``Qwen3ForCausalLM``, called as the public AttnRes
    decoder layers call them (``self.self_attn(self.input_layernorm(h))`` and
    ``self.mlp(self.post_attention_layernorm(h))``)."""

    def __init__(self, base: Qwen3ForCausalLM, tokens: torch.Tensor):
        base.config._attn_implementation = "sdpa"  # causal with no mask: is_causal=True
        self.m = base.model
        self.lm_head = base.lm_head
        self.eps = base.config.rms_norm_eps
        self.emb = self.m.embed_tokens(tokens)
        positions = torch.arange(tokens.shape[1])[None].expand(tokens.shape[0], -1)
        self.pos = self.m.rotary_emb(self.emb, positions)

    def attn(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        block = self.m.layers[layer]
        return block.self_attn(block.input_layernorm(h), position_embeddings=self.pos, attention_mask=None)[0]

    def mlp(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        block = self.m.layers[layer]
        return block.mlp(block.post_attention_layernorm(h))

    def head(self, y: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.m.norm(y))


def _router(routers: dict, prefix: str):
    return routers[f"{prefix}_res_proj.weight"], routers[f"{prefix}_res_norm.weight"], routers.get(f"{prefix}_res_bias")


# ------------------------------------------------------------------------ the references
@torch.no_grad()
def delta_full(base: Qwen3ForCausalLM, routers: dict, tokens: torch.Tensor, *, heads: Optional[int] = None):
    """DELTA ``attnres_mode="full"`` (wdlctc/delta-attention-residuals-code@fc11c3e,
    Attention-Residuals/modeling_qwen3_attnres.py): ``blocks=[]``, ``partial=inputs_embeds``
    (1067-1072); per sublayer route over ``blocks + [partial]``, then ``blocks += [partial];
    partial = out`` (927-955); the final router over all of them, then ``model.norm``
    (1112-1116). ``heads`` routes per head as MHAR's ``full_mh`` (same sources, DELTA's fork)."""
    q = _Qwen3(base, tokens)
    weights: list = []

    def mix(sources, prefix):
        query, gain, _ = _router(routers, prefix)
        if heads is None:
            return route(sources, query, gain, q.eps, weights_out=weights)
        return route_per_head(sources, query, gain, q.eps, heads, weights_out=weights)

    blocks, partial = [], q.emb
    for layer in range(len(q.m.layers)):
        attn_out = q.attn(layer, mix(blocks + [partial], f"model.layers.{layer}.attn"))
        blocks, partial = blocks + [partial], attn_out
        mlp_out = q.mlp(layer, mix(blocks + [partial], f"model.layers.{layer}.mlp"))
        blocks, partial = blocks + [partial], mlp_out
    return q.head(mix(blocks + [partial], "model.final")), weights


@torch.no_grad()
def open_block(base: Qwen3ForCausalLM, routers: dict, tokens: torch.Tensor, n_blocks: int):
    """OPEN ``attnres_mode="block"`` (wdlctc/open-attention-residuals@83d2b8d,
    Attention-Residuals/modeling_qwen3_attnres.py): ``blocks=[inputs_embeds]``,
    ``partial=inputs_embeds`` (881-882); the attention router runs on the old partial, then at
    ``layer > 0 and layer % lpb == 0`` (414-416) ``blocks += [partial]; partial = 0`` (684-691);
    partial accumulates both outputs (702, 716); every router adds its scalar bias to the last
    source (171); the final router, with ``final_res_bias``, over ``blocks + [partial]`` (923-927)."""
    q = _Qwen3(base, tokens)
    weights: list = []
    n_layers = len(q.m.layers)
    per_block = max(1, math.ceil(n_layers / n_blocks))

    def mix(sources, prefix):
        query, gain, bias = _router(routers, prefix)
        return route(sources, query, gain, q.eps, bias=bias, weights_out=weights)

    blocks, partial = [q.emb], q.emb
    for layer in range(n_layers):
        h = mix(blocks + [partial], f"model.layers.{layer}.attn")
        if layer > 0 and layer % per_block == 0:
            blocks, partial = blocks + [partial], torch.zeros_like(partial)
        partial = partial + q.attn(layer, h)
        partial = partial + q.mlp(layer, mix(blocks + [partial], f"model.layers.{layer}.mlp"))
    return q.head(mix(blocks + [partial], "model.final")), weights


# ------------------------------------------------------------------------ fixture generators
def router_weights(config: dict, *, biases: bool, final: bool, seed: int, query_std: float = 0.4) -> dict:
    """Random router tensors under the public keys: queries N(0, query_std) (never zero), key
    gains in [0.5, 1.5), scalar biases N(0, 1) where the layout has them."""
    gen = torch.Generator().manual_seed(seed)
    d = config["hidden_size"]
    out = {}
    prefixes = [f"model.layers.{l}.{s}" for l in range(config["num_hidden_layers"]) for s in ("attn", "mlp")]
    for prefix in prefixes + (["model.final"] if final else []):
        out[f"{prefix}_res_proj.weight"] = torch.randn(1, d, generator=gen) * query_std
        out[f"{prefix}_res_norm.weight"] = torch.rand(d, generator=gen) + 0.5
        if biases:
            out[f"{prefix}_res_bias"] = torch.randn((), generator=gen)
    return out


#: layout -> (router keys: biases, final router; config fields the repository writes)
LAYOUTS = {
    "delta-full": (dict(biases=False, final=True), dict(attnres_mode="full", attnres_num_blocks=8, attnres_gate_type="bias")),
    "mhar-full_mh": (
        dict(biases=False, final=True),
        dict(attnres_mode="full_mh", attnres_num_blocks=8, attnres_gate_type="bias", attnres_num_heads=4),
    ),
    # train_scratch.py's settings (OPEN 101-120): 4 blocks, recency-bias init 0.0, tied embeddings.
    "open-block": (
        dict(biases=True, final=True),
        dict(attnres_mode="block", attnres_num_blocks=2, attnres_gate_type="bias", attnres_recency_bias_init=0.0),
    ),
}


def write_layout(directory: Path, layout: str, *, seed: int = 0, n_layers: int = 3, tied: bool = False):
    """A checkpoint of ``layout`` in ``directory``: the Qwen3 weights of a random HF model plus
    random routers. Returns ``(base, routers, config)`` for the reference."""
    keys, fields = LAYOUTS[layout]
    base = tiny_qwen3(seed=seed, n_layers=n_layers, tied=tied).eval()
    directory = Path(directory)
    base.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    routers = router_weights(config, seed=seed + 1, **keys)
    state = load_file(str(directory / "model.safetensors"))
    state.update(routers)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config.update(model_type="qwen3_attnres", architectures=["Qwen3AttnResForCausalLM"], **fields)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return base, routers, config


def reference(layout: str, base, routers: dict, config: dict, tokens: torch.Tensor):
    """The public repository's logits and routing weights for a checkpoint of ``layout``."""
    if layout == "delta-full":
        return delta_full(base, routers, tokens)
    if layout == "mhar-full_mh":
        return delta_full(base, routers, tokens, heads=config["attnres_num_heads"])
    if layout == "open-block":
        return open_block(base, routers, tokens, config["attnres_num_blocks"])
    raise ValueError(f"no reference for layout {layout!r}; layouts are {tuple(LAYOUTS)}")


# ------------------------------------------------------------------------ NANO (BabyLM nanoGPT)
#: NanoGPTConfig fields (YpLarryWang/nanoGPT@78b6df6, eval/hf_nanogpt/modeling_nanogpt.py 30-79)
#: of a tiny Block AttnRes export, as eval/convert_nanogpt_to_hf.py writes them (tied head).
NANO_CONFIG = dict(
    model_type="nanogpt", architectures=["NanoGPTForCausalLM"], vocab_size=300, block_size=64, n_layer=2,
    n_head=4, n_embd=32, dropout=0.0, bias=False, use_rmsnorm=False, use_swiglu=False, swiglu_mult=8 / 3,
    use_rope=False, use_attn_gate=False, use_attn_res=True, attn_res_block_size=2, bidirectional=False,
    rope_theta=10000.0, layer_norm_epsilon=1e-5, tie_word_embeddings=True,
    auto_map={"AutoConfig": "modeling_nanogpt.NanoGPTConfig", "AutoModelForCausalLM": "modeling_nanogpt.NanoGPTForCausalLM"},
)


def nano_state(config: dict, seed: int) -> dict:
    """Random weights under NANO's parameter names (HF 96-291): ``transformer.wte/wpe/h.{l}/ln_f``,
    the routers ``attn_res_q{1,2}`` [C] and ``attn_res_norm{1,2}.weight`` per block, and
    ``attn_res_qf`` / ``attn_res_normf.weight``; no ``lm_head.weight`` (tied to ``wte``)."""
    gen = torch.Generator().manual_seed(seed)
    C, L, V = config["n_embd"], config["n_layer"], config["vocab_size"]
    rand = lambda *shape, std=0.02: torch.randn(*shape, generator=gen) * std  # noqa: E731
    gain = lambda: torch.rand(C, generator=gen) + 0.5  # noqa: E731
    sd = {"transformer.wte.weight": rand(V, C, std=1.0), "transformer.ln_f.weight": gain()}
    if not config["use_rope"]:
        sd["transformer.wpe.weight"] = rand(config["block_size"], C, std=0.5)
    hidden = round(int(config["swiglu_mult"] * C) / 64) * 64 if config["use_swiglu"] else 4 * C
    for l in range(L):
        p = f"transformer.h.{l}"
        sd[f"{p}.ln_1.weight"], sd[f"{p}.ln_2.weight"] = gain(), gain()
        sd[f"{p}.attn.c_attn.weight"], sd[f"{p}.attn.c_proj.weight"] = rand(3 * C, C, std=0.2), rand(C, C, std=0.2)
        if config["use_swiglu"]:
            sd[f"{p}.mlp.c_gate.weight"], sd[f"{p}.mlp.c_val.weight"] = rand(hidden, C, std=0.2), rand(hidden, C, std=0.2)
        else:
            sd[f"{p}.mlp.c_fc.weight"] = rand(hidden, C, std=0.2)
        sd[f"{p}.mlp.c_proj.weight"] = rand(C, hidden, std=0.2)
        for i in (1, 2):
            sd[f"{p}.attn_res_q{i}"], sd[f"{p}.attn_res_norm{i}.weight"] = rand(C, std=0.4), gain()
        if config["bias"]:
            for name in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                out = sd[f"{p}.{name}.weight"].shape[0]
                sd[f"{p}.{name}.bias"] = rand(out, std=0.1)
    if config["bias"]:
        sd["transformer.ln_f.bias"] = rand(C, std=0.1)
    sd["attn_res_qf"], sd["attn_res_normf.weight"] = rand(C, std=0.4), gain()
    return sd


def write_nano(directory: Path, *, seed: int = 0, **fields):
    """A BabyLM-style NanoGPTForCausalLM export (config.json + model.safetensors)."""
    config = {**NANO_CONFIG, **fields}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = nano_state(config, seed)
    save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return config, sd


@torch.no_grad()
def nano(config: dict, sd: dict, tokens: torch.Tensor):
    """NANO's forward (YpLarryWang/nanoGPT@78b6df6, eval/hf_nanogpt/modeling_nanogpt.py):
    ``attn_res_mix`` (113-117: softmax over depth of <q, RMSNorm(V)>, raw values), the block's
    ``forward_attn_res`` (257-266: q1 router over ``blocks + [partial]``, then at a block start
    ``blocks += [partial]; partial = None``; ``partial = attn_out (+ partial)``; q2 router;
    ``partial += mlp_out``) and ``_transformer_forward`` (295-310: ``blocks=[]``, ``partial=emb``,
    the ``attn_res_qf`` router, ``ln_f``, the tied head)."""
    F = torch.nn.functional
    C, H, eps = config["n_embd"], config["n_head"], config["layer_norm_epsilon"]
    B, T = tokens.shape
    get = lambda name: sd.get(name)  # noqa: E731

    def norm(x, prefix):  # make_norm (88-93): RMSNorm or LayerNorm, eps layer_norm_epsilon
        if config["use_rmsnorm"]:
            return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * sd[f"{prefix}.weight"]
        return F.layer_norm(x, (C,), sd[f"{prefix}.weight"], get(f"{prefix}.bias"), eps)

    def linear(x, prefix):
        return F.linear(x, sd[f"{prefix}.weight"], get(f"{prefix}.bias"))

    def rope(x):  # build_rope_cache / apply_rope (120-140)
        hd = x.shape[-1]
        inv = 1.0 / (config["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(T).float(), inv)
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def attn(x, p):  # CausalSelfAttention (143-200), dense causal
        h = norm(x, f"{p}.ln_1")
        q, k, v = linear(h, f"{p}.attn.c_attn").split(C, dim=2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        if config["use_rope"]:
            q, k = rope(q), rope(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        if config["use_attn_gate"]:
            y = y * torch.sigmoid(linear(h, f"{p}.attn.attn_gate"))
        return linear(y, f"{p}.attn.c_proj")

    def mlp(x, p):  # MLP (204-214: GELU, exact) or SwiGLU (217-230)
        h = norm(x, f"{p}.ln_2")
        if config["use_swiglu"]:
            return linear(F.silu(linear(h, f"{p}.mlp.c_gate")) * linear(h, f"{p}.mlp.c_val"), f"{p}.mlp.c_proj")
        return linear(F.gelu(linear(h, f"{p}.mlp.c_fc")), f"{p}.mlp.c_proj")

    weights: list = []

    def mix(sources, q, gain):
        V = torch.stack(sources)
        K = V / torch.sqrt(V.pow(2).mean(-1, keepdim=True) + 1e-5) * gain  # RMSNorm(n_embd): eps 1e-5
        w = torch.einsum("c,sbtc->sbt", q, K).softmax(dim=0)
        weights.append(w.permute(1, 2, 0))
        return torch.einsum("sbt,sbtc->btc", w, V)

    x = sd["transformer.wte.weight"][tokens]
    if not config["use_rope"]:
        x = x + sd["transformer.wpe.weight"][:T]
    blocks, partial = [], x
    for l in range(config["n_layer"]):
        p = f"transformer.h.{l}"
        h = mix(blocks + [partial], sd[f"{p}.attn_res_q1"], sd[f"{p}.attn_res_norm1.weight"])
        if (2 * l) % config["attn_res_block_size"] == 0:
            blocks, partial = blocks + [partial], None
        out = attn(h, p)
        partial = out if partial is None else partial + out
        h = mix(blocks + [partial], sd[f"{p}.attn_res_q2"], sd[f"{p}.attn_res_norm2.weight"])
        partial = partial + mlp(h, p)
    y = mix(blocks + [partial], sd["attn_res_qf"], sd["attn_res_normf.weight"])
    return norm(y, "transformer.ln_f") @ sd["transformer.wte.weight"].T, weights
