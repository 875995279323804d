"""The intervention values: :class:`Intervention`, its modes and its constructors.

See the package docstring (:mod:`attnres_lens.interventions`) for the exact definition of
every mode and target. Adding a mode touches three places: ``MODES`` (and
``REPLACING_MODES`` if it replaces a target by a value), its value check in
:data:`VALUE_CHECKS`, and its op in ``compile.OP_OF_MODE``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from jaxtyping import Int
from torch import Tensor

from ..compat import ActivationCache
from ..model import HookedAttnResTransformer
from ..names import TARGETS
from ..selection import as_index, as_where, resolve_where


MODES: tuple[str, ...] = ("zero", "mask", "mean", "patch", "resample", "scale")
#: Modes that replace a target by a value taken from elsewhere.
REPLACING_MODES: tuple[str, ...] = ("mean", "patch", "resample")

IndexLike = Union[None, int, slice, range, Sequence[int], Tensor]


class MaskAllSourcesError(ValueError):
    """Masking would leave a router nothing to route to (every logit ``-inf``)."""


def describe_value(value: Any) -> str:
    """A short description of an intervention's value for messages (no tensor dumps)."""
    if isinstance(value, Tensor):
        return f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    if isinstance(value, ActivationCache):
        return f"ActivationCache({len(value.cache_dict)} hooks)"
    if isinstance(value, Mapping):
        return f"{type(value).__name__}({len(value)} hooks)"
    return repr(value)


def _is_cache(value: Any) -> bool:
    return isinstance(value, (ActivationCache, Mapping))


def _is_tokens(value: Any) -> bool:
    return isinstance(value, Tensor) and not (
        value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool
    )


# ------------------------------------------------------------------ value checks, one per mode
def _check_no_value(mode: str, value: Any) -> None:
    if value is not None:
        raise ValueError(f"mode {mode!r} takes no value, got {describe_value(value)}")


def _check_scale(mode: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"mode 'scale' needs a real factor as value, got {describe_value(value)}")
    if not math.isfinite(value):
        raise ValueError(f"the scale factor must be finite, got {value!r}")


def _check_patch(mode: str, value: Any) -> None:
    if value is None:
        raise ValueError("mode 'patch' needs a value: an ActivationCache of the run to patch from")
    if not (_is_cache(value) or (isinstance(value, Tensor) and value.dtype.is_floating_point)):
        raise TypeError(
            "mode 'patch' takes an ActivationCache, a mapping of hook names to tensors, or "
            f"(for a single Slice) a float tensor, got {describe_value(value)}"
        )


def _check_mean(mode: str, value: Any) -> None:
    if value is None:
        raise ValueError(
            "mode 'mean' needs a reference batch as value: integer tokens [batch, pos] or "
            "an ActivationCache of the reference run"
        )
    if not (_is_cache(value) or _is_tokens(value)):
        raise TypeError(
            f"mode 'mean' takes integer reference tokens or an ActivationCache, got {describe_value(value)}"
        )


def _check_resample(mode: str, value: Any) -> None:
    if value is not None and not (_is_cache(value) or _is_tokens(value)):
        raise TypeError(
            "mode 'resample' takes None (resample within the batch), integer reference "
            f"tokens or an ActivationCache, got {describe_value(value)}"
        )


#: How each mode's value is checked (raises on a bad value).
VALUE_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "zero": _check_no_value,
    "mask": _check_no_value,
    "scale": _check_scale,
    "patch": _check_patch,
    "mean": _check_mean,
    "resample": _check_resample,
}


# ------------------------------------------------------------------ the value
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
        object.__setattr__(self, "where", as_where(self.where))
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
        VALUE_CHECKS[self.mode](self.mode, self.value)
        object.__setattr__(self, "positions", as_index("positions", self.positions))
        object.__setattr__(self, "batch", as_index("batch", self.batch))
        if not isinstance(self.average_positions, bool):
            raise TypeError(f"average_positions must be a bool, got {self.average_positions!r}")
        if self.average_positions and self.mode != "mean":
            raise ValueError("average_positions only applies to mode 'mean'")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")

    def __repr__(self) -> str:
        parts = [repr(self.where), f"mode={self.mode!r}"]
        if self.target is not None:
            parts.append(f"target={self.target!r}")
        if self.value is not None:
            parts.append(f"value={describe_value(self.value)}")
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
        from .compile import to_hooks  # compile builds on this module

        return to_hooks(model, [self])



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


__all__ = [
    "IndexLike",
    "Intervention",
    "MODES",
    "MaskAllSourcesError",
    "REPLACING_MODES",
    "VALUE_CHECKS",
    "describe_value",
    "mask",
    "mean_ablate",
    "patch",
    "resample",
    "resample_indices",
    "scale",
    "zero",
]
