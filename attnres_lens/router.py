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

Besides :class:`DepthSource` (what one source is) and :class:`RouterSpec` (a router and its
sources), :func:`source_layout` gives which sources each router reads; the layout itself is
stated once, in :mod:`attnres_lens.scheme`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional

import torch
from jaxtyping import Float
from torch import Tensor, nn

from .compat import HookPoint
from .names import RouterId

if TYPE_CHECKING:  # annotations only: the config imports the scheme, which imports this module
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
        return self.mix(self.logits(stacked), stacked)

    def mix(
        self, logits: Float[Tensor, "rows pos source"], stacked: Float[Tensor, "batch pos source d_model"]
    ) -> Float[Tensor, "rows pos d_model"]:
        """The router from its logits on (``hook_logits`` -> softmax -> ``hook_weights`` ->
        weighted sum -> ``hook_out``): the forward's second half, and what estimators rerun.

        ``logits`` may stack ``S`` runs of the ``batch`` items of ``stacked``
        (``rows = S * batch``); the sources are then shared by all runs (broadcast, never copied).
        """
        logits = self.hook_logits(logits)
        # Softmax in fp32 so that bf16 models still route with full-precision weights.
        weights = self.hook_weights(torch.softmax(logits.float(), dim=-1).to(stacked.dtype))
        if weights.shape[0] == stacked.shape[0]:
            return self.hook_out(torch.matmul(weights.unsqueeze(-2), stacked).squeeze(-2))
        n_items = stacked.shape[0]
        runs = weights.view(weights.shape[0] // n_items, n_items, *weights.shape[1:])
        mixed = runs.unsqueeze(-2) @ stacked.unsqueeze(0)
        return self.hook_out(mixed.reshape(weights.shape[0], weights.shape[1], -1))

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


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every :class:`DepthRouter` in ``model``, found by module type (so a
    renamed or wrapped model, e.g. TL 4's bridge or a Hugging Face wrapper, finds them too)."""
    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, DepthRouter):
            for p in module.parameters():
                seen.setdefault(id(p), p)
    return list(seen.values())


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
    #: the components this source sums: ``-1`` the embedding, ``k`` sublayer ``k``'s output
    #: (``attn_l = 2l``, ``mlp_l = 2l + 1``); two sources with the same members are one tensor
    members: frozenset[int]


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
    def id(self) -> RouterId:
        """This router's :class:`~attnres_lens.names.RouterId`."""
        return RouterId(self.layer, self.sublayer)

    @property
    def n_sources(self) -> int:
        return len(self.sources)

    @property
    def has_current(self) -> bool:
        """Whether the last source is the in-progress one (the depth state's ``current``)."""
        return bool(self.sources) and self.sources[-1].family == "current"

    @property
    def n_completed(self) -> int:
        """How many sources are completed ones (the depth state's ``completed``)."""
        return self.n_sources - int(self.has_current)

    def source_of(self, component: int) -> int:
        """The index of the first source that sums ``component`` (``-1`` embedding, ``k`` sublayer)."""
        for source in self.sources:
            if component in source.members:
                return source.index
        raise ValueError(f"no source of {self.name} holds component {component}")

    def families(self) -> tuple[str, ...]:
        """The families present at this router, in source order, without repeats."""
        return tuple(dict.fromkeys(s.family for s in self.sources))


def source_layout(cfg: "AttnResConfig") -> list[RouterSpec]:
    """Every router of a model with config ``cfg``, with its sources, in forward order: the
    labels reader of ``cfg.scheme`` (:class:`~attnres_lens.scheme.RoutingScheme`), which runs
    the spec's state machine on labels and component sets instead of tensors."""
    return cfg.scheme.layout()
