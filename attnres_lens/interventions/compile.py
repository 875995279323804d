"""Compile interventions into per-router ops and TransformerLens hooks.

Each mode becomes one small op class (pyvene style): an op knows the hook stage it acts at and
how it rewrites the selected ``[batch, pos, source]`` cells there (:meth:`RouterOp.apply`).
:class:`RouterProgram` runs all ops of one router in forward order (sources, logits, weights,
out) and, within one hook point, in list order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from jaxtyping import Float
from torch import Tensor

from ..compat import HookPoint
from ..model import HookedAttnResTransformer
from ..router import RouterSpec
from ..selection import IndexSelector, describe_router, resolve_where, select_indices, Slice
from .providers import CellContext, Provider, ReferenceMemo, make_provider
from .spec import Intervention, MaskAllSourcesError

#: The hook stage a replacing intervention acts at, per target.
STAGE_OF_TARGET = {"weight": "weights", "source": "sources", "contribution": "out"}
#: Stages in forward order; the stage ``s`` is the hook point ``{router}.hook_{s}``.
STAGES: tuple[str, ...] = ("sources", "logits", "weights", "out")


@dataclass
class RouterOp:
    """One intervention at one router: which cells, on which items of a (stacked) run."""

    spec: RouterSpec
    sources: tuple[int, ...]
    positions: IndexSelector
    batch: IndexSelector
    offset: int = 0  # the first run item of this intervention's prompts (stacked sweeps)
    local_batch: Optional[int] = None  # how many prompts it owns (None: the whole run)
    origin: str = ""  # names the intervention in error messages
    _source_index: dict = field(default_factory=dict, repr=False)

    stage = "weights"

    def source_tensor(self, device: torch.device) -> Tensor:
        if device not in self._source_index:
            self._source_index[device] = torch.tensor(self.sources, dtype=torch.long, device=device)
        return self._source_index[device]

    def context(self, x: Tensor, n_pos: int) -> CellContext:
        """The selected cells of this op in the activation ``x`` (validated against the run)."""
        local = self.local_batch if self.local_batch is not None else x.shape[0]
        items = torch.tensor(select_indices("batch items", self.batch, local, self.origin), device=x.device)
        positions = torch.tensor(select_indices("positions", self.positions, x.shape[1], self.origin), device=x.device)
        return CellContext(x, items, positions, self.source_tensor(x.device), local, n_pos, self.offset)

    @staticmethod
    def run_index(ctx: CellContext) -> tuple[Tensor, Tensor, Tensor]:
        """Advanced index of the selected cells in the (stacked) run."""
        items = ctx.batch + ctx.offset
        return items[:, None, None], ctx.positions[None, :, None], ctx.sources[None, None, :]

    def apply(self, x: Tensor, ctx: CellContext) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class MaskOp(RouterOp):
    """``logit_i := -inf``: the softmax renormalises over the other sources."""

    stage = "logits"

    def apply(self, x: Tensor, ctx: CellContext) -> None:
        x[self.run_index(ctx)] = float("-inf")


class ZeroOp(RouterOp):
    """``alpha_i := 0`` after the softmax."""

    def apply(self, x: Tensor, ctx: CellContext) -> None:
        x[self.run_index(ctx)] = 0.0


@dataclass
class ScaleOp(RouterOp):
    """``alpha_i := factor * alpha_i`` after the softmax."""

    factor: float = 1.0

    def apply(self, x: Tensor, ctx: CellContext) -> None:
        index = self.run_index(ctx)
        x[index] = x[index] * self.factor


@dataclass
class ReplaceOp(RouterOp):
    """The target := the provider's value (``patch``, ``mean``, ``resample``)."""

    provider: Optional[Provider] = None
    target_stage: str = "weights"

    @property
    def stage(self) -> str:  # type: ignore[override]
        return self.target_stage

    def replacement(self, ctx: CellContext, like: Tensor) -> Tensor:
        return self.provider.get(ctx).to(device=like.device, dtype=like.dtype)

    def apply(self, x: Tensor, ctx: CellContext) -> None:
        x[self.run_index(ctx)] = self.replacement(ctx, x)


def _mask_op(model: HookedAttnResTransformer, iv: Intervention, common: dict, memo: ReferenceMemo) -> RouterOp:
    spec = common["spec"]
    if len(common["sources"]) == spec.n_sources:
        raise MaskAllSourcesError(
            f"masking every source of {spec.name} leaves it nothing to route to; at most "
            f"{spec.n_sources - 1} of its sources can be masked ({describe_router(spec)})"
        )
    return MaskOp(**common)


def _replace_op(model: HookedAttnResTransformer, iv: Intervention, common: dict, memo: ReferenceMemo) -> RouterOp:
    provider = make_provider(model, iv, common["spec"], memo)
    return ReplaceOp(**common, provider=provider, target_stage=STAGE_OF_TARGET[iv.target])


#: The op each mode compiles to, at one router.
OP_OF_MODE: dict[str, Callable[..., RouterOp]] = {
    "zero": lambda model, iv, common, memo: ZeroOp(**common),
    "mask": _mask_op,
    "scale": lambda model, iv, common, memo: ScaleOp(**common, factor=float(iv.value)),
    "patch": _replace_op,
    "mean": _replace_op,
    "resample": _replace_op,
}


def compile_interventions(
    model: HookedAttnResTransformer,
    interventions: Any,
    *,
    offset: int = 0,
    local_batch: Optional[int] = None,
    memo: Optional[ReferenceMemo] = None,
) -> list[RouterOp]:
    """Validate ``interventions`` against ``model`` and turn them into per-router ops.

    ``offset``/``local_batch`` place them on batch items ``offset .. offset + local_batch - 1``
    of a stacked run (the batched sweep engine); by default they act on the whole run.
    """
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    if not isinstance(interventions, (list, tuple)):
        raise TypeError(
            f"interventions must be an Intervention or a list of them, got {type(interventions).__name__}"
        )
    memo = memo if memo is not None else ReferenceMemo()
    ops: list[RouterOp] = []
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise TypeError(f"expected Intervention objects, got {iv!r}")
        touched = resolve_where(model, iv.where)
        if iv.mode == "patch" and isinstance(iv.value, Tensor) and not isinstance(iv.where, Slice):
            raise ValueError(
                "a tensor patch value is only defined for a single Slice; to patch a Family or a "
                "Group pass an ActivationCache of the run to patch from"
            )
        for spec, sources in touched:
            common = dict(spec=spec, sources=sources, positions=iv.positions, batch=iv.batch,
                          offset=offset, local_batch=local_batch, origin=f"{iv!r} at {spec.name}")
            ops.append(OP_OF_MODE[iv.mode](model, iv, common, memo))
    return ops


# ============================================================================ hooks
class RouterProgram:
    """All ops at one router, applied in forward order (sources, logits, weights, out)."""

    def __init__(self, spec: RouterSpec, ops: list[RouterOp]):
        self.spec = spec
        self.by_stage: dict[str, list[RouterOp]] = {stage: [] for stage in STAGES}
        for op in ops:
            self.by_stage[op.stage].append(op)
        # a contribution replacement needs this run's alpha and v, captured on the way
        self.needs_capture = bool(self.by_stage["out"])
        self.sources_seen: Optional[Tensor] = None
        self.weights_seen: Optional[Tensor] = None

    def hooks(self) -> list[tuple[str, Any]]:
        functions = {"sources": self.on_sources, "logits": self.on_logits,
                     "weights": self.on_weights, "out": self.on_out}
        out = []
        for stage in STAGES:
            capture = self.needs_capture and stage in ("sources", "weights")
            if self.by_stage[stage] or capture:
                out.append((f"{self.spec.name}.hook_{stage}", functions[stage]))
        return out

    @staticmethod
    def _apply(x: Tensor, ops: list[RouterOp]) -> Tensor:
        x = x.clone()
        for op in ops:
            op.apply(x, op.context(x, x.shape[1]))
        return x

    def on_sources(
        self, x: Float[Tensor, "batch pos source d_model"], hook: HookPoint
    ) -> Float[Tensor, "batch pos source d_model"]:
        if self.by_stage["sources"]:
            x = self._apply(x, self.by_stage["sources"])
        if self.needs_capture:
            self.sources_seen = x
        return x

    def on_logits(
        self, x: Float[Tensor, "batch pos source"], hook: HookPoint
    ) -> Float[Tensor, "batch pos source"]:
        x = self._apply(x, self.by_stage["logits"])
        dead = torch.isneginf(x).all(dim=-1)
        if bool(dead.any()):
            item, position = (int(i) for i in dead.nonzero()[0])
            raise MaskAllSourcesError(
                f"the masks at {self.spec.name} together mask every source at batch item {item}, "
                f"position {position}, leaving nothing to route to; at most {self.spec.n_sources - 1} of "
                f"its sources can be masked at once ({describe_router(self.spec)})"
            )
        return x

    def on_weights(
        self, x: Float[Tensor, "batch pos source"], hook: HookPoint
    ) -> Float[Tensor, "batch pos source"]:
        if self.by_stage["weights"]:
            x = self._apply(x, self.by_stage["weights"])
        if self.needs_capture:
            self.weights_seen = x
        return x

    def on_out(
        self, out: Float[Tensor, "batch pos d_model"], hook: HookPoint
    ) -> Float[Tensor, "batch pos d_model"]:
        """``out := out - alpha_i v_i + r_i`` for every contribution replacement."""
        weights, sources = self.weights_seen, self.sources_seen
        self.weights_seen = self.sources_seen = None
        if weights is None or sources is None:  # pragma: no cover - the router always fires them first
            raise RuntimeError(f"{self.spec.name}: hook_out fired without hook_sources/hook_weights")
        contributions = weights.unsqueeze(-1) * sources  # [batch, pos, source, d_model]
        out = out.clone()
        for op in self.by_stage["out"]:
            ctx = op.context(contributions, out.shape[1])
            index = op.run_index(ctx)
            old = contributions[index]
            new = op.replacement(ctx, out).expand_as(old)
            contributions[index] = new
            rows, positions = index[0][:, :, 0], index[1][:, :, 0]
            out[rows, positions] = out[rows, positions] + (new - old).sum(dim=-2)
        return out


def hooks_from_ops(ops: list[RouterOp]) -> list[tuple[str, Any]]:
    """TransformerLens ``(hook_name, fn)`` pairs running ``ops``, one program per router."""
    by_router: dict[str, list[RouterOp]] = {}
    for op in ops:
        by_router.setdefault(op.spec.name, []).append(op)
    hooks: list[tuple[str, Any]] = []
    for router_ops in by_router.values():
        hooks.extend(RouterProgram(router_ops[0].spec, router_ops).hooks())
    return hooks


def to_hooks(model: HookedAttnResTransformer, interventions: Any) -> list[tuple[str, Any]]:
    """TransformerLens ``(hook_name, fn)`` pairs applying ``interventions`` together.

    Use them with ``model.run_with_hooks(tokens, fwd_hooks=...)`` or ``model.hooks(...)``.
    Everything is validated here (routers, sources, families, caches) except what depends on
    the run itself (positions and batch items, tensor lengths), which is checked when the
    hooks fire. Reference batches given as tokens (``mean``, ``resample``) are run now, with
    the model as it is. Hook names are the canonical ``{router}.hook_{sources,logits,weights,out}``.
    """
    return hooks_from_ops(compile_interventions(model, interventions))


@contextmanager
def model_with_interventions(
    model: HookedAttnResTransformer, interventions: Any
) -> Iterator[HookedAttnResTransformer]:
    """Context manager: inside it, every forward of ``model`` applies ``interventions``.

    The hooks are removed on exit, also when the body raises. Nothing else about the model
    changes (no parameter is touched)::

        with model_with_interventions(model, [zero(("blocks.3.attn_router", 0))]):
            loss = model(tokens, return_type="loss")
    """
    hooks = to_hooks(model, interventions)
    with model.hooks(fwd_hooks=hooks):
        yield model


#: Alias of :func:`model_with_interventions`.
apply_interventions = model_with_interventions


def run_with_interventions(
    model: HookedAttnResTransformer,
    tokens: Any,
    interventions: Any,
    return_type: Optional[str] = "logits",
    **kwargs: Any,
) -> Any:
    """Run ``model(tokens, return_type=...)`` once with ``interventions`` applied."""
    return model.run_with_hooks(
        tokens, return_type=return_type, fwd_hooks=to_hooks(model, interventions), **kwargs
    )


__all__ = [
    "MaskOp",
    "OP_OF_MODE",
    "ReplaceOp",
    "RouterOp",
    "RouterProgram",
    "STAGES",
    "STAGE_OF_TARGET",
    "ScaleOp",
    "ZeroOp",
    "apply_interventions",
    "compile_interventions",
    "hooks_from_ops",
    "model_with_interventions",
    "run_with_interventions",
    "to_hooks",
]
