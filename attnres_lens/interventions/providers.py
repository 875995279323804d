"""Value providers: where a replacing intervention (``patch``, ``mean``, ``resample``) takes its
replacement ``r`` for the selected ``[batch, pos, source]`` cells, one small class each.

A provider's :meth:`Provider.get` receives a :class:`CellContext` (the activation at the hook,
the selected cells, the run's shape) and returns ``r`` for those cells.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ..compat import ActivationCache
from ..model import HookedAttnResTransformer
from ..router import RouterSpec
from ..selection import describe_router
from .spec import Intervention, resample_indices

#: The router hooks each target reads from a reference run.
HOOKS_OF_TARGET: dict[str, tuple[str, ...]] = {
    "weight": ("weights",),
    "source": ("sources",),
    "contribution": ("weights", "sources"),
}


def gather_cells(t: Tensor, batch: Tensor, positions: Tensor, sources: Tensor) -> Tensor:
    """``t[batch][:, positions][:, :, sources]`` for ``t`` laid out ``[batch, pos, source, ...]``."""
    return t[batch[:, None, None], positions[None, :, None], sources[None, None, :]]


@dataclass
class CellContext:
    """What a provider sees when its op runs inside a hook."""

    x: Tensor  # the activation at this hook point, as modified so far (the whole run's batch)
    batch: Tensor  # selected batch items, local to this intervention's prompts
    positions: Tensor
    sources: Tensor
    local_batch: int
    n_pos: int
    offset: int  # where this intervention's prompts start in a stacked run


class Provider:
    """Computes the replacement ``r`` for the selected ``[b, p, s]`` cells."""

    target: str

    def get(self, ctx: CellContext) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def combine_target(target: str, gathered: Mapping[str, Tensor]) -> Tensor:
    """The target's value from the gathered ``weights``/``sources``: ``alpha``, ``v`` or ``alpha v``."""
    if target == "weight":
        return gathered["weights"]
    if target == "source":
        return gathered["sources"]
    return gathered["weights"].unsqueeze(-1) * gathered["sources"]


class ResampleIndex:
    """The reference items a run of ``local_batch`` items takes (:func:`resample_indices`), memoised."""

    def __init__(self, n_reference: int, seed: int):
        self.n_reference, self.seed = n_reference, seed
        self._by_batch: dict[int, Tensor] = {}

    def __call__(self, local_batch: int) -> Tensor:
        if local_batch not in self._by_batch:
            self._by_batch[local_batch] = resample_indices(
                local_batch, seed=self.seed, n_reference=self.n_reference
            )
        return self._by_batch[local_batch]


class FromCache(Provider):
    """Patch from / resample from a reference run's ``weights [B, P, S]`` and ``sources [B, P, S, d]``.

    Patch: run item ``b`` takes cache item ``b`` (or the only item of a batch-1 cache).
    Resample (``resample`` given): run item ``b`` takes reference item ``resample(B)[b]``.
    """

    def __init__(
        self,
        target: str,
        tensors: dict[str, Tensor],
        names: dict[str, str],
        spec: RouterSpec,
        d_model: int,
        resample: Optional[ResampleIndex] = None,
    ):
        self.target, self.tensors, self.names, self.spec = target, tensors, names, spec
        self.resample = resample
        for what, t in tensors.items():
            trailing = (spec.n_sources,) if what == "weights" else (spec.n_sources, d_model)
            if t.ndim != 2 + len(trailing) or tuple(t.shape[2:]) != trailing:
                raise ValueError(
                    f"cached {names[what]} has shape {tuple(t.shape)}; at {spec.name} it must be "
                    f"[batch, pos, {', '.join(map(str, trailing))}] ({describe_router(spec)})"
                )

    def _check_run_shape(self, what: str, t: Tensor, ctx: CellContext) -> None:
        if t.shape[1] == ctx.n_pos and (self.resample is not None or t.shape[0] in (ctx.local_batch, 1)):
            return
        raise ValueError(
            f"cached {self.names[what]} has shape {tuple(t.shape)}, but this run has batch "
            f"{ctx.local_batch} and {ctx.n_pos} positions: "
            + (
                f"the reference must have {ctx.n_pos} positions"
                if self.resample is not None
                else f"a patch needs [{ctx.local_batch} (or 1), {ctx.n_pos}, ...]"
            )
        )

    def _reference_rows(self, t: Tensor, ctx: CellContext) -> Tensor:
        if self.resample is not None:
            return self.resample(ctx.local_batch).to(t.device)[ctx.batch.to(t.device)]
        if t.shape[0] == 1:  # one cached item serves every prompt
            return torch.zeros_like(ctx.batch, device=t.device)
        return ctx.batch.to(t.device)

    def get(self, ctx: CellContext) -> Tensor:
        gathered = {}
        for what, t in self.tensors.items():
            self._check_run_shape(what, t, ctx)
            rows = self._reference_rows(t, ctx)
            gathered[what] = gather_cells(t, rows, ctx.positions.to(t.device), ctx.sources.to(t.device))
        return combine_target(self.target, gathered)


class FromSliceTensor(Provider):
    """Patch one slice from a user tensor ``[B, P]`` (weight) or ``[B, P, d]`` (source/contribution)."""

    def __init__(self, target: str, value: Tensor, spec: RouterSpec, d_model: int):
        self.target, self.spec = target, spec
        trailing = () if target == "weight" else (d_model,)
        if value.ndim != 2 + len(trailing) or tuple(value.shape[2:]) != trailing:
            want = "[batch, pos]" if target == "weight" else f"[batch, pos, {d_model}]"
            raise ValueError(
                f"patch tensor for target {target!r} at one slice of {spec.name} must have shape "
                f"{want} (batch, pos{', d_model' if trailing else ''}), got {tuple(value.shape)}"
            )
        self.value = value

    def get(self, ctx: CellContext) -> Tensor:
        t = self.value
        if t.shape[0] not in (ctx.local_batch, 1) or t.shape[1] != ctx.n_pos:
            raise ValueError(
                f"patch tensor has shape {tuple(t.shape)}, but this run has batch {ctx.local_batch} "
                f"and {ctx.n_pos} positions: it must be [{ctx.local_batch} (or 1), {ctx.n_pos}"
                f"{'' if self.target == 'weight' else ', d_model'}]"
            )
        rows = ctx.batch if t.shape[0] != 1 else torch.zeros_like(ctx.batch)
        rows, positions = rows.to(t.device), ctx.positions.to(t.device)
        picked = t[rows[:, None], positions[None, :]]  # [n_batch, n_pos(, d)]
        return picked.unsqueeze(2).expand(*picked.shape[:2], len(ctx.sources), *picked.shape[2:])


class FromMean(Provider):
    """Replace by a precomputed mean ``[P, S(, d)]`` (or ``[S(, d)]`` averaged over positions)."""

    def __init__(self, target: str, mean: Tensor, per_position: bool, name: str):
        self.target, self.mean, self.per_position, self.name = target, mean, per_position, name

    def get(self, ctx: CellContext) -> Tensor:
        mean = self.mean
        sources = ctx.sources.to(mean.device)
        if not self.per_position:
            return mean[sources].unsqueeze(0).unsqueeze(0).expand(1, len(ctx.positions), *mean[sources].shape)
        if mean.shape[0] != ctx.n_pos:
            raise ValueError(
                f"the mean reference for {self.name} has {mean.shape[0]} positions but this run has "
                f"{ctx.n_pos}; use a reference batch of the same length or average_positions=True"
            )
        return mean[ctx.positions.to(mean.device)][:, sources].unsqueeze(0)  # [1, n_pos, n_sources(, d)]


class FromRun(Provider):
    """Resample within the batch of this run: item ``b`` takes item ``perm[b]``'s value."""

    def __init__(self, target: str, seed: int):
        self.target, self.seed = target, seed
        self._perm: dict[int, Tensor] = {}

    def get(self, ctx: CellContext) -> Tensor:
        if ctx.local_batch not in self._perm:
            self._perm[ctx.local_batch] = resample_indices(ctx.local_batch, seed=self.seed)
        device = ctx.x.device
        source_rows = self._perm[ctx.local_batch].to(device)[ctx.batch.to(device)] + ctx.offset
        # ctx.x is this hook's activation (for "contribution": alpha_j v_j per source)
        return gather_cells(ctx.x, source_rows, ctx.positions, ctx.sources)


# ============================================================================ reference runs
class ReferenceMemo:
    """Reference runs and means shared between the interventions of one compilation."""

    def __init__(self) -> None:
        self.store: dict[Any, Any] = {}


def cache_mapping(value: Any) -> Mapping:
    """The ``{hook name: tensor}`` mapping of an ``ActivationCache`` (or the mapping itself)."""
    return value.cache_dict if isinstance(value, ActivationCache) else value


def lookup_router_tensor(cache: Mapping, spec: RouterSpec, what: str) -> Tensor:
    """``cache["{router}.hook_{what}"]`` (or its block-level alias), or a ``KeyError`` saying how to cache it."""
    name = f"{spec.name}.hook_{what}"
    if name in cache:
        return cache[name]
    alias = f"blocks.{spec.layer}.hook_{spec.sublayer}_router_{what}" if spec.layer is not None else None
    if alias is not None and alias in cache:
        return cache[alias]
    routers = sorted(k for k in cache if "router" in str(k))
    shown = routers[:8] + (["..."] if len(routers) > 8 else [])
    raise KeyError(
        f"the cache has no {name!r}, which this intervention needs at {spec.name}; router hooks in "
        f"the cache: {shown if routers else 'none'} (run model.run_with_cache with names_filter "
        f"including {name!r})"
    )


def reference_cache(
    model: HookedAttnResTransformer, value: Any, names: list[str], memo: ReferenceMemo
) -> Mapping:
    """A cache-like mapping for ``value``: itself if it is a cache, else a run on the tokens."""
    if isinstance(value, (ActivationCache, Mapping)):
        return cache_mapping(value)
    store = memo.store.setdefault(("run", id(value)), {"tokens": value, "cache": {}})
    missing = [n for n in names if n not in store["cache"]]
    if missing:
        tokens = model.validate_tokens(value)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=missing)
        store["cache"].update({n: cache.cache_dict[n] for n in missing})
    return store["cache"]


def make_provider(
    model: HookedAttnResTransformer, intervention: Intervention, spec: RouterSpec, memo: ReferenceMemo
) -> Provider:
    """The provider of a replacing intervention at one router."""
    target, d_model = intervention.target, model.cfg.d_model
    if intervention.mode == "patch" and isinstance(intervention.value, Tensor):
        return FromSliceTensor(target, intervention.value, spec, d_model)
    if intervention.mode == "resample" and intervention.value is None:
        return FromRun(target, intervention.seed)
    whats = HOOKS_OF_TARGET[target]
    names = {w: f"{spec.name}.hook_{w}" for w in ("weights", "sources")}
    cache = reference_cache(model, intervention.value, [names[w] for w in whats], memo)
    tensors = {w: lookup_router_tensor(cache, spec, w) for w in whats}
    if intervention.mode == "mean":
        return _mean_provider(intervention, spec, cache, tensors, names, memo, d_model)
    resampler = None
    if intervention.mode == "resample":
        resampler = ResampleIndex(next(iter(tensors.values())).shape[0], intervention.seed)
    return FromCache(target, tensors, names, spec, d_model, resampler)


def _mean_provider(
    intervention: Intervention,
    spec: RouterSpec,
    cache: Mapping,
    tensors: dict[str, Tensor],
    names: dict[str, str],
    memo: ReferenceMemo,
    d_model: int,
) -> FromMean:
    target, average_positions = intervention.target, intervention.average_positions
    key = ("mean", id(cache), spec.name, target, average_positions)
    if key not in memo.store:
        FromCache(target, tensors, names, spec, d_model)  # validates the shapes
        full = combine_target(target, tensors)
        memo.store[key] = full.mean(dim=(0, 1) if average_positions else 0)
    return FromMean(target, memo.store[key], not average_positions, spec.name)


__all__ = [
    "CellContext",
    "FromCache",
    "FromMean",
    "FromRun",
    "FromSliceTensor",
    "HOOKS_OF_TARGET",
    "Provider",
    "ReferenceMemo",
    "ResampleIndex",
    "cache_mapping",
    "combine_target",
    "gather_cells",
    "lookup_router_tensor",
    "make_provider",
    "reference_cache",
]
