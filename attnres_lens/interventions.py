"""Interventions on depth-source slices: zero, mask, scale, mean-ablate, patch, resample.

A *depth-source slice* is one source ``i`` of one router (``shared/spec/attnres.md``)::

    logit_i = w . RMSNorm_g(v_i) (+ b on the last source)     # hook_logits  [batch, pos, source]
    alpha   = softmax_i(logit_i)                               # hook_weights [batch, pos, source]
    out     = sum_i alpha_i * v_i                              # hook_out     [batch, pos, d_model]

An :class:`Intervention` is a small declarative value: *where* (a :class:`Slice`, a
:class:`Family` at a router, or a :class:`Group` across routers), *how* (a mode), on *what*
(a target, for the replacing modes) and *with what* (a value), optionally restricted to some
positions and batch items. Modes, exactly:

- ``zero``: ``alpha_i := 0`` after the softmax; the other weights are untouched, so the weights
  no longer sum to 1 and ``out = sum_{j != i} alpha_j v_j``.
- ``mask``: ``logit_i := -inf`` before the softmax, so the remaining sources are renormalised:
  ``alpha_j = exp(logit_j) / sum_{k not masked} exp(logit_k)``. Masking every source of a router
  (at any position) is an error.
- ``scale``: ``alpha_i := s * alpha_i`` after the softmax (no renormalisation); ``s = 1`` is the
  identity, ``s = 0`` is ``zero``.
- ``patch``: replace the target by its value in another run (an ``ActivationCache``; for a single
  slice also a tensor), batch item ``b`` from item ``b`` (or from the one item of a batch-1 cache).
- ``mean``: replace the target by its mean over a reference batch (tokens, or a cache of the
  reference run), per position, or also over positions with ``average_positions=True``.
- ``resample``: replace the target at batch item ``b`` by its value at item ``perm[b]`` of the
  same run (``reference=None``; ``perm`` a seeded derangement, see :func:`resample_indices`) or
  at item ``idx[b]`` of a reference batch (``idx`` drawn uniformly with the seed).

Targets of ``patch``, ``mean`` and ``resample``:

- ``weight``: ``alpha_i := r_i`` at ``hook_weights`` (other weights untouched).
- ``source``: ``v_i := r_i`` at ``hook_sources``, *before* the keys are computed, so the key
  ``RMSNorm(v_i)``, hence every weight of the router, follows the new value.
- ``contribution``: ``out := out - alpha_i v_i + r_i`` at ``hook_out``, where ``alpha_i`` and
  ``v_i`` are the weight and source this router actually used in this run and ``r_i`` is the
  replacement's ``alpha_i v_i``; the weights and the other contributions are untouched.

Interventions compose: a list applies together. At one router they act in forward order
(sources, logits, weights, out) and, within one hook point, in list order.
:func:`to_hooks` gives TransformerLens ``(hook_name, fn)`` pairs for ``model.run_with_hooks``;
:func:`model_with_interventions` is a context manager that always removes them;
:func:`run_with_interventions` runs the model once with them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .compat import ActivationCache, HookPoint
from .model import HookedAttnResTransformer
from .names import SUBLAYERS, TARGETS, router_name
from .router import FAMILIES, RouterSpec

MODES: tuple[str, ...] = ("zero", "mask", "mean", "patch", "resample", "scale")
#: Modes that replace a target by a value taken from elsewhere.
REPLACING_MODES: tuple[str, ...] = ("mean", "patch", "resample")

IndexLike = Union[None, int, slice, range, Sequence[int], Tensor]


class MaskAllSourcesError(ValueError):
    """Masking would leave a router nothing to route to (every logit ``-inf``)."""


# ============================================================================ where
@dataclass(frozen=True)
class Slice:
    """One source of one router: ``Slice("blocks.3.attn_router", 1)``.

    ``router`` is the router's hook prefix as in ``model.source_table()`` (``"final_router"``
    for the kimi final router); ``source`` its index there (negative counts from the end, so
    ``-1`` is the last source, the ``current`` one when present).
    """

    router: str
    source: int

    def __post_init__(self) -> None:
        if not isinstance(self.router, str):
            raise TypeError(f"Slice.router must be a router name (str), got {self.router!r}")
        if isinstance(self.source, bool) or not isinstance(self.source, int):
            raise TypeError(f"Slice.source must be an int source index, got {self.source!r}")

    @classmethod
    def at(cls, layer: Optional[int], sublayer: str, source: int) -> "Slice":
        """``Slice.at(3, "attn", 1)``; the final router is ``Slice.at(None, "final", i)``."""
        return cls(router_name(layer, sublayer), source)


@dataclass(frozen=True)
class Family:
    """Every source of one family (``"embedding"``, ``"current"``, ``"history"``) at a router."""

    router: str
    family: str

    def __post_init__(self) -> None:
        if not isinstance(self.router, str):
            raise TypeError(f"Family.router must be a router name (str), got {self.router!r}")
        if not isinstance(self.family, str):
            raise TypeError(f"Family.family must be a str, got {self.family!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; families are {FAMILIES}")


@dataclass(frozen=True)
class Group:
    """Sources across routers.

    Either by criteria: every source whose family is in ``families``, at every router whose
    sublayer is in ``sublayers`` and whose layer is in ``layers`` (a depth band, e.g.
    ``range(0, 6)``); ``None`` means "any". The final router has no layer: ``layers`` does not
    filter it, select it with ``sublayers="final"``. Or explicitly: ``slices`` is a sequence of
    ``(router, source)`` pairs. ``label`` names the group in tables.
    """

    families: Any = None
    sublayers: Any = None
    layers: Any = None
    slices: Any = None
    label: str = ""

    def __post_init__(self) -> None:
        def strings(name: str, value: Any, valid: tuple[str, ...]) -> Optional[tuple[str, ...]]:
            if value is None:
                return None
            items = (value,) if isinstance(value, str) else tuple(value)
            for item in items:
                if item not in valid:
                    raise ValueError(f"Group.{name}: unknown value {item!r}; valid: {valid}")
            if not items:
                raise ValueError(f"Group.{name} is empty; give None for 'any'")
            return items

        object.__setattr__(self, "families", strings("families", self.families, FAMILIES))
        object.__setattr__(self, "sublayers", strings("sublayers", self.sublayers, SUBLAYERS))
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
            for layer in layers:
                if isinstance(layer, bool) or not isinstance(layer, int):
                    raise TypeError(f"Group.layers must hold ints, got {layer!r}")
            object.__setattr__(self, "layers", layers)
        if self.slices is not None:
            if any(v is not None for v in (self.families, self.sublayers, self.layers)):
                raise ValueError("Group takes either slices or families/sublayers/layers, not both")
            pairs = []
            for item in self.slices:
                item = item if not isinstance(item, Slice) else (item.router, item.source)
                if (
                    not isinstance(item, tuple)
                    or len(item) != 2
                    or not isinstance(item[0], str)
                    or isinstance(item[1], bool)
                    or not isinstance(item[1], int)
                ):
                    raise TypeError(
                        f"Group.slices must hold (router, source) pairs or Slices, got {item!r}"
                    )
                pairs.append((item[0], int(item[1])))
            if not pairs:
                raise ValueError("Group.slices is empty")
            object.__setattr__(self, "slices", tuple(pairs))
        if not isinstance(self.label, str):
            raise TypeError(f"Group.label must be a str, got {self.label!r}")


def _as_where(where: Any) -> Union[Slice, Family, Group]:
    if isinstance(where, (Slice, Family, Group)):
        return where
    if isinstance(where, tuple) and len(where) == 2 and isinstance(where[0], str):
        if isinstance(where[1], str):
            return Family(where[0], where[1])
        if isinstance(where[1], int) and not isinstance(where[1], bool):
            return Slice(where[0], where[1])
    raise TypeError(
        "where must be a Slice, a Family, a Group, or a shorthand tuple (router, source_index) / "
        f"(router, family), got {where!r}"
    )


def _as_index(name: str, value: Any) -> Union[None, slice, tuple[int, ...]]:
    """Normalise a positions / batch selector (validated against a length at run time)."""
    if value is None or isinstance(value, slice):
        return value
    if isinstance(value, Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be integer indices, got a tensor of dtype {value.dtype}")
        value = value.reshape(-1).tolist()
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, a slice or a sequence of ints, got {value!r}")
    if isinstance(value, int):
        return (value,)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be an int, a slice or a sequence of ints, got {value!r}")
    items = tuple(value)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise TypeError(f"{name} must hold ints, got {item!r} in {value!r}")
    if not items:
        raise ValueError(f"{name} is empty; pass None to act on all of them")
    return items


# ============================================================================ the value
@dataclass(frozen=True, eq=False, repr=False)
class Intervention:
    """One intervention. See the module docstring for the exact definition of each mode.

    Args:
        where: a :class:`Slice`, :class:`Family` or :class:`Group` (or the shorthands
            ``(router, source_index)`` and ``(router, family)``).
        mode: ``"zero"``, ``"mask"``, ``"scale"``, ``"patch"``, ``"mean"`` or ``"resample"``.
        target: for ``patch``/``mean``/``resample``: ``"weight"`` (default), ``"source"`` or
            ``"contribution"``. Must be left ``None`` for the other modes.
        value: ``scale``: the factor ``s``. ``patch``: an ``ActivationCache`` (or a mapping of
            hook names to tensors) of the run to patch from; for a single :class:`Slice` also a
            tensor ``[batch, pos]`` (weight) or ``[batch, pos, d_model]`` (source, contribution).
            ``mean``: the reference batch (integer tokens) or a cache of it. ``resample``:
            ``None`` (resample within the batch) or a reference batch (tokens or cache).
        positions: positions to act on (int, sequence, slice; negative counts from the end);
            ``None`` = all.
        batch: batch items to act on; ``None`` = all.
        average_positions: ``mean`` only: also average over positions (the default averages
            over the reference batch per position).
        seed: ``resample`` only: seeds the resampling map (:func:`resample_indices`).
    """

    where: Any
    mode: str = "zero"
    target: Optional[str] = None
    value: Any = None
    positions: Any = None
    batch: Any = None
    average_positions: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "where", _as_where(self.where))
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; valid modes: {MODES}")
        if self.mode in REPLACING_MODES:
            target = "weight" if self.target is None else self.target
            if not isinstance(target, str) or target not in TARGETS:
                raise ValueError(
                    f"unknown target {target!r} for mode {self.mode!r}; valid targets: {TARGETS}"
                )
            object.__setattr__(self, "target", target)
        elif self.target is not None:
            raise ValueError(
                f"target={self.target!r} does not apply to mode {self.mode!r} (zero and scale act on "
                "the weight alpha_i after the softmax, mask on the logit); targets are for "
                f"{REPLACING_MODES}"
            )
        self._check_value()
        object.__setattr__(self, "positions", _as_index("positions", self.positions))
        object.__setattr__(self, "batch", _as_index("batch", self.batch))
        if not isinstance(self.average_positions, bool):
            raise TypeError(f"average_positions must be a bool, got {self.average_positions!r}")
        if self.average_positions and self.mode != "mean":
            raise ValueError("average_positions only applies to mode 'mean'")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")

    def _check_value(self) -> None:
        mode, value = self.mode, self.value
        is_cache = isinstance(value, (ActivationCache, Mapping))
        is_tokens = isinstance(value, Tensor) and not (
            value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool
        )
        if mode in ("zero", "mask"):
            if value is not None:
                raise ValueError(f"mode {mode!r} takes no value, got {_short(value)}")
        elif mode == "scale":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"mode 'scale' needs a real factor as value, got {_short(value)}")
            if not math.isfinite(value):
                raise ValueError(f"the scale factor must be finite, got {value!r}")
        elif mode == "patch":
            if value is None:
                raise ValueError("mode 'patch' needs a value: an ActivationCache of the run to patch from")
            if not (is_cache or (isinstance(value, Tensor) and value.dtype.is_floating_point)):
                raise TypeError(
                    "mode 'patch' takes an ActivationCache, a mapping of hook names to tensors, or "
                    f"(for a single Slice) a float tensor, got {_short(value)}"
                )
        elif mode == "mean":
            if value is None:
                raise ValueError(
                    "mode 'mean' needs a reference batch as value: integer tokens [batch, pos] or "
                    "an ActivationCache of the reference run"
                )
            if not (is_cache or is_tokens):
                raise TypeError(
                    "mode 'mean' takes integer reference tokens or an ActivationCache, got "
                    f"{_short(value)}"
                )
        elif mode == "resample":
            if value is not None and not (is_cache or is_tokens):
                raise TypeError(
                    "mode 'resample' takes None (resample within the batch), integer reference "
                    f"tokens or an ActivationCache, got {_short(value)}"
                )

    def __repr__(self) -> str:
        parts = [repr(self.where), f"mode={self.mode!r}"]
        if self.target is not None:
            parts.append(f"target={self.target!r}")
        if self.value is not None:
            parts.append(f"value={_short(self.value)}")
        for name in ("positions", "batch"):
            if getattr(self, name) is not None:
                parts.append(f"{name}={getattr(self, name)!r}")
        if self.average_positions:
            parts.append("average_positions=True")
        if self.mode == "resample" and self.seed:
            parts.append(f"seed={self.seed}")
        return f"Intervention({', '.join(parts)})"

    # ------------------------------------------------------------------ conveniences
    def slices(self, model: "HookedAttnResTransformer") -> list[tuple[str, int]]:
        """The ``(router, source)`` pairs this intervention acts on, in forward order."""
        return [(spec.name, s) for spec, sources in resolve_where(model, self.where) for s in sources]

    def to_hooks(self, model: "HookedAttnResTransformer") -> list[tuple[str, Any]]:
        """TransformerLens ``(hook_name, fn)`` pairs (see :func:`to_hooks`)."""
        return to_hooks(model, [self])


def _short(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    if isinstance(value, ActivationCache):
        return f"ActivationCache({len(value.cache_dict)} hooks)"
    if isinstance(value, Mapping):
        return f"{type(value).__name__}({len(value)} hooks)"
    return repr(value)


# -------------------------------------------------------------------- constructors
def zero(where: Any, *, positions: IndexLike = None, batch: IndexLike = None) -> Intervention:
    """``alpha_i := 0`` after the softmax (the others untouched)."""
    return Intervention(where, "zero", positions=positions, batch=batch)


def mask(where: Any, *, positions: IndexLike = None, batch: IndexLike = None) -> Intervention:
    """``logit_i := -inf`` before the softmax (the others renormalised)."""
    return Intervention(where, "mask", positions=positions, batch=batch)


def scale(
    where: Any, factor: float, *, positions: IndexLike = None, batch: IndexLike = None
) -> Intervention:
    """``alpha_i := factor * alpha_i`` after the softmax (no renormalisation)."""
    return Intervention(where, "scale", value=factor, positions=positions, batch=batch)


def patch(
    where: Any,
    cache: Any,
    *,
    target: str = "weight",
    positions: IndexLike = None,
    batch: IndexLike = None,
) -> Intervention:
    """Replace the target by its value in another run's ``cache`` (same batch item)."""
    return Intervention(where, "patch", target=target, value=cache, positions=positions, batch=batch)


def mean_ablate(
    where: Any,
    reference: Any,
    *,
    target: str = "weight",
    average_positions: bool = False,
    positions: IndexLike = None,
    batch: IndexLike = None,
) -> Intervention:
    """Replace the target by its mean over the ``reference`` batch (tokens or cache)."""
    return Intervention(
        where,
        "mean",
        target=target,
        value=reference,
        positions=positions,
        batch=batch,
        average_positions=average_positions,
    )


def resample(
    where: Any,
    reference: Any = None,
    *,
    target: str = "weight",
    seed: int = 0,
    positions: IndexLike = None,
    batch: IndexLike = None,
) -> Intervention:
    """Replace the target by its value at another input: of this batch (``reference=None``) or
    of a reference batch (tokens or cache). See :func:`resample_indices` for the map."""
    return Intervention(
        where, "resample", target=target, value=reference, positions=positions, batch=batch, seed=seed
    )


def resample_indices(
    batch: int, *, seed: int = 0, n_reference: Optional[int] = None
) -> Int[Tensor, " batch"]:
    """The resampling map: item ``b`` takes its value from item ``result[b]``.

    Within the batch (``n_reference=None``) this is a derangement (no item keeps its own value)
    drawn with ``torch.Generator().manual_seed(seed)``; from a reference batch of
    ``n_reference`` items it is ``batch`` independent uniform draws.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    gen = torch.Generator().manual_seed(seed)
    if n_reference is not None:
        if n_reference < 1:
            raise ValueError(f"n_reference must be >= 1, got {n_reference}")
        return torch.randint(0, n_reference, (batch,), generator=gen)
    if batch < 2:
        raise ValueError(
            "resampling within the batch needs at least 2 inputs (every item takes another "
            "item's value); got a batch of 1: pass a reference batch instead"
        )
    identity = torch.arange(batch)
    while True:
        perm = torch.randperm(batch, generator=gen)
        if bool((perm != identity).all()):
            return perm


# ============================================================================ resolution
def _specs(model: "HookedAttnResTransformer") -> dict[str, RouterSpec]:
    return {spec.name: spec for spec in model.router_specs}


def describe_router(spec: RouterSpec) -> str:
    """``"blocks.2.attn_router (2 sources: 0 'emb' [embedding], 1 'block 0' [history])"``."""
    sources = ", ".join(f"{s.index} {s.label!r} [{s.family}]" for s in spec.sources)
    plural = "source" if spec.n_sources == 1 else "sources"
    return f"{spec.name} ({spec.n_sources} {plural}: {sources})"


def _router_spec(specs: dict[str, RouterSpec], name: str) -> RouterSpec:
    if name not in specs:
        layers = sorted({s.layer for s in specs.values() if s.layer is not None})
        valid = (
            f"blocks.{{l}}.attn_router and blocks.{{l}}.mlp_router for l in 0..{layers[-1]}"
            + (", final_router" if "final_router" in specs else "")
        )
        raise KeyError(f"no router named {name!r}; routers are {valid}")
    return specs[name]


def resolve_where(
    model: "HookedAttnResTransformer", where: Any
) -> list[tuple[RouterSpec, tuple[int, ...]]]:
    """The routers a where-value touches and the source indices at each, in forward order.

    Raises ``KeyError`` for an unknown router, ``IndexError`` for a source index out of range,
    ``ValueError`` for a family absent at a router or a group that selects nothing; each message
    names what is valid at that router.
    """
    where = _as_where(where)
    specs = _specs(model)
    if isinstance(where, Slice):
        spec = _router_spec(specs, where.router)
        return [(spec, (_source_index(spec, where.source),))]
    if isinstance(where, Family):
        spec = _router_spec(specs, where.router)
        sources = tuple(s.index for s in spec.sources if s.family == where.family)
        if not sources:
            raise ValueError(
                f"family {where.family!r} is absent at {spec.name}; families there: "
                f"{spec.families()} ({describe_router(spec)})"
            )
        return [(spec, sources)]
    # Group
    picked: dict[str, list[int]] = {}
    if where.slices is not None:
        for router, source in where.slices:
            spec = _router_spec(specs, router)
            index = _source_index(spec, source)
            if index not in picked.setdefault(router, []):
                picked[router].append(index)
    else:
        n_layers = model.cfg.n_layers
        if where.layers is not None:
            for layer in where.layers:
                if not 0 <= layer < n_layers:
                    raise IndexError(
                        f"Group.layers: layer {layer} out of range; the model has layers "
                        f"0..{n_layers - 1}"
                    )
        for spec in specs.values():
            if where.sublayers is not None and spec.sublayer not in where.sublayers:
                continue
            if where.layers is not None and spec.layer is not None and spec.layer not in where.layers:
                continue
            sources = [
                s.index for s in spec.sources if where.families is None or s.family in where.families
            ]
            if sources:
                picked[spec.name] = sources
    if not picked:
        raise ValueError(
            f"group {where.label or where!r} selects no source of this model (families="
            f"{where.families}, sublayers={where.sublayers}, layers={where.layers})"
        )
    order = {spec.name: i for i, spec in enumerate(specs.values())}
    return [
        (specs[name], tuple(sorted(sources)))
        for name, sources in sorted(picked.items(), key=lambda kv: order[kv[0]])
    ]


def _source_index(spec: RouterSpec, source: int) -> int:
    n = spec.n_sources
    if not -n <= source < n:
        raise IndexError(
            f"source {source} out of range at {spec.name}, which has {n} source"
            f"{'s' if n != 1 else ''} (valid indices 0..{n - 1}, or -{n}..-1): "
            f"{describe_router(spec)}"
        )
    return source % n


# ============================================================================ compiled ops
_TARGET_STAGE = {"weight": "weights", "source": "sources", "contribution": "out"}
_HOOK_OF_STAGE = {"sources": "hook_sources", "logits": "hook_logits", "weights": "hook_weights", "out": "hook_out"}


def _gather(t: Tensor, b: Tensor, p: Tensor, s: Tensor) -> Tensor:
    """``t[b][:, p][:, :, s]`` for ``t`` laid out ``[batch, pos, source, ...]``."""
    return t[b[:, None, None], p[None, :, None], s[None, None, :]]


@dataclass
class _Ctx:
    """What a value provider sees when its op runs inside a hook."""

    x: Tensor  # the activation at this hook point, as modified so far (the whole run's batch)
    b_loc: Tensor  # selected batch items, local to this intervention's prompts
    p: Tensor
    s: Tensor
    local_batch: int
    n_pos: int
    offset: int


class _Provider:
    """Computes the replacement ``r`` for the selected ``[b, p, s]`` cells."""

    target: str

    def get(self, ctx: _Ctx) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class _FromCache(_Provider):
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
        resample: Optional["_ResampleIndex"] = None,
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

    def get(self, ctx: _Ctx) -> Tensor:
        gathered = {}
        for what, t in self.tensors.items():
            if t.shape[1] != ctx.n_pos or (
                self.resample is None and t.shape[0] not in (ctx.local_batch, 1)
            ):
                raise ValueError(
                    f"cached {self.names[what]} has shape {tuple(t.shape)}, but this run has batch "
                    f"{ctx.local_batch} and {ctx.n_pos} positions: "
                    + (
                        f"the reference must have {ctx.n_pos} positions"
                        if self.resample is not None
                        else f"a patch needs [{ctx.local_batch} (or 1), {ctx.n_pos}, ...]"
                    )
                )
            if self.resample is not None:
                rows = self.resample(ctx.local_batch).to(t.device)[ctx.b_loc.to(t.device)]
            elif t.shape[0] == 1:
                rows = torch.zeros_like(ctx.b_loc, device=t.device)
            else:
                rows = ctx.b_loc.to(t.device)
            gathered[what] = _gather(t, rows, ctx.p.to(t.device), ctx.s.to(t.device))
        if self.target == "weight":
            return gathered["weights"]
        if self.target == "source":
            return gathered["sources"]
        return gathered["weights"].unsqueeze(-1) * gathered["sources"]


class _FromSliceTensor(_Provider):
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

    def get(self, ctx: _Ctx) -> Tensor:
        t = self.value
        if t.shape[0] not in (ctx.local_batch, 1) or t.shape[1] != ctx.n_pos:
            raise ValueError(
                f"patch tensor has shape {tuple(t.shape)}, but this run has batch {ctx.local_batch} "
                f"and {ctx.n_pos} positions: it must be [{ctx.local_batch} (or 1), {ctx.n_pos}"
                f"{'' if self.target == 'weight' else ', d_model'}]"
            )
        rows = ctx.b_loc if t.shape[0] != 1 else torch.zeros_like(ctx.b_loc)
        rows, p = rows.to(t.device), ctx.p.to(t.device)
        out = t[rows[:, None], p[None, :]]  # [nb, np(, d)]
        return out.unsqueeze(2).expand(*out.shape[:2], len(ctx.s), *out.shape[2:])


class _FromMean(_Provider):
    """Replace by a precomputed mean ``[P, S(, d)]`` (or ``[S(, d)]`` averaged over positions)."""

    def __init__(self, target: str, mean: Tensor, per_position: bool, name: str):
        self.target, self.mean, self.per_position, self.name = target, mean, per_position, name

    def get(self, ctx: _Ctx) -> Tensor:
        m = self.mean
        s = ctx.s.to(m.device)
        if self.per_position:
            if m.shape[0] != ctx.n_pos:
                raise ValueError(
                    f"the mean reference for {self.name} has {m.shape[0]} positions but this run has "
                    f"{ctx.n_pos}; use a reference batch of the same length or average_positions=True"
                )
            return m[ctx.p.to(m.device)][:, s].unsqueeze(0)  # [1, np, ns(, d)]
        return m[s].unsqueeze(0).unsqueeze(0).expand(1, len(ctx.p), *m[s].shape)


class _FromRun(_Provider):
    """Resample within the batch of this run: item ``b`` takes item ``perm[b]``'s value."""

    def __init__(self, target: str, seed: int):
        self.target, self.seed = target, seed
        self._perm: dict[int, Tensor] = {}

    def get(self, ctx: _Ctx) -> Tensor:
        if ctx.local_batch not in self._perm:
            self._perm[ctx.local_batch] = resample_indices(ctx.local_batch, seed=self.seed)
        src_rows = self._perm[ctx.local_batch].to(ctx.x.device)[ctx.b_loc.to(ctx.x.device)] + ctx.offset
        # ctx.x is this hook's activation (for "contribution": alpha_j v_j per source)
        return _gather(ctx.x, src_rows, ctx.p, ctx.s)


@dataclass
class _Op:
    spec: RouterSpec
    stage: str  # "sources" | "logits" | "weights" | "out"
    kind: str  # "zero" | "mask" | "scale" | "replace"
    sources: tuple[int, ...]
    positions: Union[None, slice, tuple[int, ...]]
    batch: Union[None, slice, tuple[int, ...]]
    factor: float = 1.0
    provider: Optional[_Provider] = None
    offset: int = 0
    local_batch: Optional[int] = None
    origin: str = ""
    _s_cache: dict = field(default_factory=dict)

    def s_index(self, device: torch.device) -> Tensor:
        if device not in self._s_cache:
            self._s_cache[device] = torch.tensor(self.sources, dtype=torch.long, device=device)
        return self._s_cache[device]


def _select(name: str, sel: Union[None, slice, tuple[int, ...]], n: int, origin: str) -> list[int]:
    if sel is None:
        return list(range(n))
    if isinstance(sel, slice):
        picked = list(range(n))[sel]
        if not picked:
            raise ValueError(f"{name} {sel!r} selects nothing out of {n} ({origin})")
        return picked
    out = []
    for i in sel:
        if not -n <= i < n:
            raise IndexError(
                f"{name} {i} out of range for {n} {name} in this run (valid: 0..{n - 1} or "
                f"-{n}..-1) ({origin})"
            )
        out.append(i % n)
    return out


class _Memo:
    """Reference runs and means shared between the interventions of one compilation."""

    def __init__(self) -> None:
        self.store: dict[Any, Any] = {}


def _cache_dict(value: Any) -> Mapping:
    return value.cache_dict if isinstance(value, ActivationCache) else value


def _lookup(cache: Mapping, spec: RouterSpec, what: str) -> Tensor:
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


def _reference_cache(
    model: "HookedAttnResTransformer", value: Any, names: list[str], memo: _Memo
) -> Mapping:
    """A cache-like mapping for ``value``: itself if it is a cache, else a run on the tokens."""
    if isinstance(value, (ActivationCache, Mapping)):
        return _cache_dict(value)
    key = ("run", id(value))
    store = memo.store.setdefault(key, {"tokens": value, "cache": {}})
    missing = [n for n in names if n not in store["cache"]]
    if missing:
        tokens = model.validate_tokens(value)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=missing)
        store["cache"].update({n: cache.cache_dict[n] for n in missing})
    return store["cache"]


def _needed(target: str) -> tuple[str, ...]:
    return {"weight": ("weights",), "source": ("sources",), "contribution": ("weights", "sources")}[target]


def _compile(
    model: "HookedAttnResTransformer",
    interventions: Any,
    *,
    offset: int = 0,
    local_batch: Optional[int] = None,
    memo: Optional[_Memo] = None,
) -> list[_Op]:
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
    memo = memo if memo is not None else _Memo()
    d_model = model.cfg.d_model
    ops: list[_Op] = []
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
            origin = f"{iv!r} at {spec.name}"
            common = dict(
                spec=spec,
                sources=sources,
                positions=iv.positions,
                batch=iv.batch,
                offset=offset,
                local_batch=local_batch,
                origin=origin,
            )
            if iv.mode == "mask":
                if len(sources) == spec.n_sources:
                    raise MaskAllSourcesError(
                        f"masking every source of {spec.name} leaves it nothing to route to; at most "
                        f"{spec.n_sources - 1} of its sources can be masked ({describe_router(spec)})"
                    )
                ops.append(_Op(stage="logits", kind="mask", **common))
            elif iv.mode in ("zero", "scale"):
                factor = 0.0 if iv.mode == "zero" else float(iv.value)
                ops.append(_Op(stage="weights", kind=iv.mode, factor=factor, **common))
            else:
                provider = _provider(model, iv, spec, memo, d_model)
                ops.append(
                    _Op(stage=_TARGET_STAGE[iv.target], kind="replace", provider=provider, **common)
                )
    return ops


def _provider(
    model: "HookedAttnResTransformer", iv: Intervention, spec: RouterSpec, memo: _Memo, d_model: int
) -> _Provider:
    target = iv.target
    whats = _needed(target)
    names = {w: f"{spec.name}.hook_{w}" for w in ("weights", "sources")}
    if iv.mode == "patch" and isinstance(iv.value, Tensor):
        return _FromSliceTensor(target, iv.value, spec, d_model)
    if iv.mode == "resample" and iv.value is None:
        return _FromRun(target, iv.seed)
    cache = _reference_cache(model, iv.value, [names[w] for w in whats], memo)
    tensors = {w: _lookup(cache, spec, w) for w in whats}
    if iv.mode == "mean":
        key = ("mean", id(cache), spec.name, target, iv.average_positions)
        if key not in memo.store:
            _FromCache(target, tensors, names, spec, d_model)  # validates the shapes
            if target == "weight":
                full = tensors["weights"]
            elif target == "source":
                full = tensors["sources"]
            else:
                full = tensors["weights"].unsqueeze(-1) * tensors["sources"]
            memo.store[key] = full.mean(dim=(0, 1) if iv.average_positions else 0)
        return _FromMean(target, memo.store[key], not iv.average_positions, spec.name)
    resampler = None
    if iv.mode == "resample":
        resampler = _ResampleIndex(next(iter(tensors.values())).shape[0], iv.seed)
    return _FromCache(target, tensors, names, spec, d_model, resampler)


class _ResampleIndex:
    def __init__(self, n_reference: int, seed: int):
        self.n_reference, self.seed = n_reference, seed
        self._by_batch: dict[int, Tensor] = {}

    def __call__(self, local_batch: int) -> Tensor:
        if local_batch not in self._by_batch:
            self._by_batch[local_batch] = resample_indices(
                local_batch, seed=self.seed, n_reference=self.n_reference
            )
        return self._by_batch[local_batch]


# ============================================================================ hooks
class _RouterProgram:
    """All ops at one router, applied in forward order (sources, logits, weights, out)."""

    def __init__(self, spec: RouterSpec, ops: list[_Op]):
        self.spec = spec
        self.by_stage: dict[str, list[_Op]] = {"sources": [], "logits": [], "weights": [], "out": []}
        for op in ops:
            self.by_stage[op.stage].append(op)
        self.needs_capture = bool(self.by_stage["out"])
        self.v: Optional[Tensor] = None
        self.alpha: Optional[Tensor] = None
        self.contrib: Optional[Tensor] = None

    def hooks(self) -> list[tuple[str, Any]]:
        out = []
        for stage, fn in (
            ("sources", self.on_sources),
            ("logits", self.on_logits),
            ("weights", self.on_weights),
            ("out", self.on_out),
        ):
            capture = self.needs_capture and stage in ("sources", "weights")
            if self.by_stage[stage] or capture:
                out.append((f"{self.spec.name}.{_HOOK_OF_STAGE[stage]}", fn))
        return out

    def _indices(self, op: _Op, x: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        run_batch, n_pos = x.shape[0], x.shape[1]
        local = op.local_batch if op.local_batch is not None else run_batch
        b_loc = torch.tensor(_select("batch items", op.batch, local, op.origin), device=x.device)
        p = torch.tensor(_select("positions", op.positions, n_pos, op.origin), device=x.device)
        return b_loc, p, op.s_index(x.device), local

    def _apply(self, x: Tensor, ops: list[_Op]) -> Tensor:
        x = x.clone()
        for op in ops:
            b_loc, p, s, local = self._indices(op, x)
            b_run = b_loc + op.offset
            idx = (b_run[:, None, None], p[None, :, None], s[None, None, :])
            if op.kind == "mask":
                x[idx] = float("-inf")
            elif op.kind == "zero":
                x[idx] = 0.0
            elif op.kind == "scale":
                x[idx] = x[idx] * op.factor
            else:
                ctx = _Ctx(x, b_loc, p, s, local, x.shape[1], op.offset)
                x[idx] = op.provider.get(ctx).to(device=x.device, dtype=x.dtype)
        return x

    def on_sources(
        self, x: Float[Tensor, "batch pos source d_model"], hook: HookPoint
    ) -> Float[Tensor, "batch pos source d_model"]:
        if self.by_stage["sources"]:
            x = self._apply(x, self.by_stage["sources"])
        if self.needs_capture:
            self.v = x
        return x

    def on_logits(
        self, x: Float[Tensor, "batch pos source"], hook: HookPoint
    ) -> Float[Tensor, "batch pos source"]:
        x = self._apply(x, self.by_stage["logits"])
        dead = torch.isneginf(x).all(dim=-1)
        if bool(dead.any()):
            b, p = (int(i) for i in dead.nonzero()[0])
            raise MaskAllSourcesError(
                f"the masks at {self.spec.name} together mask every source at batch item {b}, "
                f"position {p}, leaving nothing to route to; at most {self.spec.n_sources - 1} of "
                f"its sources can be masked at once ({describe_router(self.spec)})"
            )
        return x

    def on_weights(
        self, x: Float[Tensor, "batch pos source"], hook: HookPoint
    ) -> Float[Tensor, "batch pos source"]:
        if self.by_stage["weights"]:
            x = self._apply(x, self.by_stage["weights"])
        if self.needs_capture:
            self.alpha = x
        return x

    def on_out(
        self, out: Float[Tensor, "batch pos d_model"], hook: HookPoint
    ) -> Float[Tensor, "batch pos d_model"]:
        alpha, v = self.alpha, self.v
        self.alpha = self.v = None
        if alpha is None or v is None:  # pragma: no cover - the router always fires them first
            raise RuntimeError(f"{self.spec.name}: hook_out fired without hook_sources/hook_weights")
        self.contrib = alpha.unsqueeze(-1) * v
        out = out.clone()
        try:
            for op in self.by_stage["out"]:
                b_loc, p, s, local = self._indices(op, self.contrib)
                b_run = b_loc + op.offset
                idx = (b_run[:, None, None], p[None, :, None], s[None, None, :])
                old = self.contrib[idx]
                ctx = _Ctx(self.contrib, b_loc, p, s, local, out.shape[1], op.offset)
                new = op.provider.get(ctx).to(device=out.device, dtype=out.dtype)
                new = new.expand_as(old)
                self.contrib[idx] = new
                out[b_run[:, None], p[None, :]] = out[b_run[:, None], p[None, :]] + (new - old).sum(dim=-2)
        finally:
            self.contrib = None
        return out


def to_hooks(model: "HookedAttnResTransformer", interventions: Any) -> list[tuple[str, Any]]:
    """TransformerLens ``(hook_name, fn)`` pairs applying ``interventions`` together.

    Use them with ``model.run_with_hooks(tokens, fwd_hooks=...)`` or ``model.hooks(...)``.
    Everything is validated here (routers, sources, families, caches) except what depends on
    the run itself (positions and batch items, tensor lengths), which is checked when the
    hooks fire. Reference batches given as tokens (``mean``, ``resample``) are run now, with
    the model as it is. Hook names are the canonical ``{router}.hook_{sources,logits,weights,out}``.
    """
    ops = _compile(model, interventions)
    return _hooks_from_ops(ops)


def _hooks_from_ops(ops: list[_Op]) -> list[tuple[str, Any]]:
    by_router: dict[str, list[_Op]] = {}
    specs: dict[str, RouterSpec] = {}
    for op in ops:
        by_router.setdefault(op.spec.name, []).append(op)
        specs[op.spec.name] = op.spec
    hooks: list[tuple[str, Any]] = []
    for name, router_ops in by_router.items():
        hooks.extend(_RouterProgram(specs[name], router_ops).hooks())
    return hooks


@contextmanager
def model_with_interventions(
    model: "HookedAttnResTransformer", interventions: Any
) -> Iterator["HookedAttnResTransformer"]:
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
    model: "HookedAttnResTransformer",
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
    "Family",
    "Group",
    "Intervention",
    "MODES",
    "MaskAllSourcesError",
    "Slice",
    "TARGETS",
    "apply_interventions",
    "describe_router",
    "mask",
    "mean_ablate",
    "model_with_interventions",
    "patch",
    "resample",
    "resample_indices",
    "resolve_where",
    "router_name",
    "run_with_interventions",
    "scale",
    "to_hooks",
    "zero",
]
