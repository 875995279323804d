"""The depth router: a learned softmax over earlier depth sources (``docs/concepts.md``).

Each routed read (the input of every attention and MLP sublayer, and in the kimi flavour the
input of the final norm) has its own router. Given sources ``V = [v_0, ..., v_{n-1}]``::

    logit_i = w . RMSNorm_g(v_i)   (+ b for i = n-1 only, when the router has a bias)
    alpha   = softmax_i(logit_i)    (per batch element and position; no 1/sqrt(d))
    out     = sum_i alpha_i * v_i

Hook points, in the order they fire (editing one changes everything after it):

- ``hook_sources`` ``[batch, pos, source, d_model]``: the stacked ``v_i``; keys *and* values are
  computed from the hooked tensor.
- ``hook_logits`` ``[batch, pos, source]``: pre-softmax, bias included (fp32 in any dtype).
- ``hook_weights`` ``[batch, pos, source]``: the routing mass ``alpha``.
- ``hook_out`` ``[batch, pos, d_model]``: the mixed input of the sublayer.

Besides :class:`DepthSource` (what one source is), this module also holds the source layout of
both flavours: which sources each router reads. :func:`source_layout` walks the spec's
state machine symbolically; the model's forward walks the same steps on tensors, using the
same predicates :func:`closes_block_before` and :func:`snapshot_after`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from jaxtyping import Float
from torch import Tensor, nn

from .compat import HookPoint
from .config import AttnResConfig

Sublayer = Literal["attn", "mlp", "final"]
Family = Literal["embedding", "current", "history"]
FAMILIES: tuple[str, ...] = ("embedding", "current", "history")


class DepthRouter(nn.Module):
    """One router. Parameter names follow the ``qwen3_attnres`` checkpoint layout.

    - ``proj.weight`` ``[1, d_model]``: the pseudo-query ``w`` (``*_res_proj.weight``), zero-initialised
      so a fresh router averages its sources.
    - ``norm.weight`` ``[d_model]``: the gain ``g`` of the key RMSNorm (``*_res_norm.weight``).
    - ``bias`` (0-dim, optional): the recency bias ``b`` added to the last source's logit
      (``*_res_bias``).
    """

    def __init__(self, d_model: int, eps: float, bias: bool, bias_init: float = 0.0):
        super().__init__()
        self.d_model = d_model
        self.eps = eps
        self.proj = nn.Linear(d_model, 1, bias=False)
        self.norm = _Gain(d_model)
        self.bias: Optional[nn.Parameter] = (
            nn.Parameter(torch.tensor(float(bias_init))) if bias else None
        )
        self.hook_sources = HookPoint()  # [batch, pos, source, d_model]
        self.hook_logits = HookPoint()  # [batch, pos, source]
        self.hook_weights = HookPoint()  # [batch, pos, source]
        self.hook_out = HookPoint()  # [batch, pos, d_model]

    @property
    def query(self) -> Float[Tensor, " d_model"]:
        """The pseudo-query ``w``."""
        return self.proj.weight[0]

    def forward(
        self, sources: list[Float[Tensor, "batch pos d_model"]]
    ) -> Float[Tensor, "batch pos d_model"]:
        stacked = self.hook_sources(torch.stack(sources, dim=2))
        logits = self.hook_logits(self.logits(stacked))
        # Softmax in fp32 so that bf16 models still route with full-precision weights.
        weights = self.hook_weights(torch.softmax(logits.float(), dim=-1).to(stacked.dtype))
        out = torch.matmul(weights.unsqueeze(-2), stacked).squeeze(-2)
        return self.hook_out(out)

    def logits(
        self, stacked: Float[Tensor, "batch pos source d_model"]
    ) -> Float[Tensor, "batch pos source"]:
        """``w . RMSNorm_g(v_i)``, plus the bias on the last source when the router has one, in
        fp32 whatever the sources' dtype."""
        # w . (g * v / rms(v)) == ((w * g) . v) / rms(v): computed this way the normalised keys
        # [batch, pos, source, d_model] are never materialised; only two reductions over the
        # sources are (a dot product and a norm), which keeps routers cheap next to sublayers.
        v = stacked.float()
        query = self.proj.weight[0].float() * self.norm.weight.float()
        mean_square = torch.linalg.vector_norm(v, dim=-1).square() / self.d_model
        # Kept in fp32 (never cast back to the sources' dtype): an fp16 logit above 65504 would
        # be inf, and the softmax of an inf is NaN.
        logits = (v @ query) * torch.rsqrt(mean_square + self.eps)
        if self.bias is not None:
            recency = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
            recency[-1] = 1.0
            logits = logits + recency * self.bias.float()
        return logits


class _Gain(nn.Module):
    """Holds the key-norm gain so that its state-dict key reads ``norm.weight``."""

    def __init__(self, d_model: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))


# ---------------------------------------------------------------------------- source layout
@dataclass(frozen=True)
class DepthSource:
    """One source of one router: what it is and how it is labelled in tables and plots."""

    index: int
    family: Family
    label: str


@dataclass(frozen=True)
class RouterSpec:
    """A router and the sources it reads, in order."""

    name: str  # hook prefix, e.g. "blocks.3.attn_router" or "final_router"
    layer: Optional[int]
    sublayer: Sublayer
    #: position in the read order attn_0, mlp_0, attn_1, ..., final (= 2 * n_layers)
    step: int
    sources: tuple[DepthSource, ...]

    @property
    def n_sources(self) -> int:
        return len(self.sources)

    def families(self) -> tuple[str, ...]:
        """The families present at this router, in source order, without repeats."""
        return tuple(dict.fromkeys(s.family for s in self.sources))


def closes_block_before(cfg: AttnResConfig, k: int) -> bool:
    """Kimi: whether the partial sum is stored as a completed source before sublayer ``k``.

    Block mode closes a block before the attention of every ``layers_per_block``-th layer (at
    layer 0 this stores the embedding as b_0). Full mode makes every sublayer output its own
    source, so it closes before every sublayer (and before the final router).
    """
    if cfg.routing_mode == "full":
        return True
    return k < cfg.n_sublayers and k % 2 == 0 and (k // 2) % cfg.layers_per_block == 0


def snapshot_after(cfg: AttnResConfig, k: int) -> bool:
    """Cumulative: whether the stream is appended to the history after sublayer ``k``."""
    if cfg.routing_mode == "full":
        return True
    return k % 2 == 1 and ((k // 2) + 1) % cfg.layers_per_block == 0


def _sublayer_name(k: int) -> str:
    return f"{'attn' if k % 2 == 0 else 'mlp'} {k // 2}"


def source_layout(cfg: AttnResConfig) -> list[RouterSpec]:
    """Every router of a model with config ``cfg``, with its sources, in forward order.

    This runs the spec's state machine on labels instead of tensors.
    """
    routers: list[RouterSpec] = []

    def spec(k: int, completed: list[str], current: Optional[str]) -> RouterSpec:
        labels = completed + ([current] if current is not None else [])
        sources = []
        for i, label in enumerate(labels):
            if i == 0:
                family: Family = "embedding"
            elif current is not None and i == len(labels) - 1:
                family = "current"
            else:
                family = "history"
            sources.append(DepthSource(i, family, label))
        if k == cfg.n_sublayers:
            return RouterSpec("final_router", None, "final", k, tuple(sources))
        sub: Sublayer = "attn" if k % 2 == 0 else "mlp"
        return RouterSpec(f"blocks.{k // 2}.{sub}_router", k // 2, sub, k, tuple(sources))

    if cfg.flavour == "kimi":
        completed: list[str] = []
        current: Optional[str] = "emb"
        n_closed = 0
        for k in range(cfg.n_sublayers + (1 if cfg.has_final_router else 0)):
            if closes_block_before(cfg, k) and current is not None:
                if cfg.routing_mode == "block" and n_closed > 0:
                    current = f"block {n_closed - 1}"
                completed.append(current)
                current = None
                n_closed += 1
            routers.append(spec(k, completed, current))
            if k < cfg.n_sublayers:
                if current is None:
                    current = "partial" if cfg.routing_mode == "block" else _sublayer_name(k)
    else:
        completed = ["emb"]
        current = "stream"
        for k in range(cfg.n_sublayers):
            routers.append(spec(k, completed, current))
            if snapshot_after(cfg, k):
                completed.append(
                    f"after {_sublayer_name(k)}"
                    if cfg.routing_mode == "full"
                    else f"after block {(k // 2) // cfg.layers_per_block}"
                )
    return routers
