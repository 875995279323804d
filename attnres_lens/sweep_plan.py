"""The exact sweep as a plan: :class:`SweepSpec` -> :func:`plan` -> :func:`execute`.

- :class:`SweepSpec`: what to sweep and how (mode, target, metric, groups, positions, ...),
  frozen and validated once, when it is made;
- :func:`plan`: the spec resolved on a model, a :class:`SweepPlan` (its units, in row order);
- :func:`execute` ``(plan, batches, executor)``: the plan run on batches of prompts by an
  executor, :class:`Local` (this process) or
  :class:`~attnres_lens.sweep_sharded.Sharded` (``checkpoint_dir``, ranks of a process group),
  giving one :class:`~attnres_lens.effects.Effects`.

:func:`measure` is one batch: the clean pass, the mass every unit holds, and the metric after
each unit's intervention, by the batched engine (:mod:`attnres_lens.sweep_engine`) or one
hooked forward per unit. ``sweep_sources`` (:mod:`attnres_lens.patching`) wraps all this.
This module is the core of the sweep: the sharded executor imports it, never the reverse.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .compat import ActivationCache
from .effects import Effects, grouping_kind
from .interventions import MODES, REPLACING_MODES, TARGETS, Intervention, MaskAllSourcesError
from .interventions.compile import compile_interventions
from .interventions.providers import HOOKS_OF_TARGET, ReferenceMemo, cache_mapping, lookup_router_tensor
from .metrics import Metric, non_finite_prompts
from .model import HookedAttnResTransformer
from .names import ROUTER_HOOKS
from .sequence import prompts_by_length
from .selection import IndexSelector, SweepUnit, Touched, as_index, select_indices, sweep_units
from .sweep_engine import Rerun, clean_pass, default_budget, first_position, run_batched, run_naive

ENGINES: tuple[str, ...] = ("batched", "naive")


class UndefinedInterventionWarning(UserWarning):
    """Some sweep rows mask every source of a router: their metric is NaN."""


def _prepare_reference(
    model: HookedAttnResTransformer,
    mode: str,
    reference: Any,
    tokens: Tensor,
    names: list[str],
    batch_size: int,
) -> Optional[dict[str, Tensor]]:
    """The reference activations the sweep's interventions read, as ``{hook name: tensor}``."""
    if mode not in REPLACING_MODES:
        if reference is not None:
            raise ValueError(f"reference= is used by modes {REPLACING_MODES}, not by {mode!r}")
        return None
    if reference is None:
        if mode == "patch":
            raise ValueError(
                "mode 'patch' needs reference=: the tokens or the ActivationCache of the run to patch from"
            )
        if mode == "resample":
            return None  # within each batch
        reference = tokens  # mean over the swept prompts themselves
    if isinstance(reference, (ActivationCache, Mapping)):
        cache = cache_mapping(reference)
        out = {}
        for name in names:
            spec = model.router_spec(name)  # RouterId.parse reads hook names
            what = next(part for part in ROUTER_HOOKS if spec.id.hook(part) == name)
            out[name] = lookup_router_tensor(cache, spec, what)
        return out
    if not isinstance(reference, Tensor):
        raise TypeError(f"reference must be integer tokens or an ActivationCache, got {type(reference).__name__}")
    ref_tokens = model.validate_tokens(reference)
    if mode == "patch" and ref_tokens.shape != tokens.shape:
        raise ValueError(
            f"patch reference tokens have shape {tuple(ref_tokens.shape)} but the swept tokens have "
            f"{tuple(tokens.shape)}: patching pairs prompt b with reference prompt b"
        )
    parts: dict[str, list[Tensor]] = {n: [] for n in names}
    with torch.no_grad():
        for start in range(0, ref_tokens.shape[0], batch_size):
            _, cache = model.run_with_cache(ref_tokens[start : start + batch_size], names_filter=names)
            for n in names:
                parts[n].append(cache.cache_dict[n])
    return {n: torch.cat(ts) for n, ts in parts.items()}


class NonFiniteMetricWarning(UserWarning):
    """The metric was NaN or infinite on some prompt: those effects are not numbers."""


def warn_if_not_finite(effects: Effects) -> None:
    """Say once, naming prompts and the first row, where the metric itself was not finite (rows
    left undefined on purpose, masking every source of a router, are not counted)."""
    clean = non_finite_prompts(effects.clean)
    if clean:
        warnings.warn(f"the metric is not finite on the clean run (prompt(s) {clean[:10]}); every effect "
                      "on those prompts is NaN: a metric must return finite values", NonFiniteMetricWarning, stacklevel=3)
        return
    for row, unit in enumerate(effects.units):
        prompts = [] if row in effects.undefined else non_finite_prompts(effects.effect[row])
        if prompts:
            warnings.warn(f"the metric is not finite after intervening on {unit.label!r} (router={unit.router!r}, "
                          f"source={unit.source!r}) on prompt(s) {prompts[:10]}; a metric must return finite "
                          "values for every slice", NonFiniteMetricWarning, stacklevel=3)
            return


@dataclass(frozen=True)
class SweepResult:
    """A sweep's :class:`~attnres_lens.effects.Effects`, with the views existing code reads:
    ``table`` (``sweep_sources``' DataFrame), ``units`` (the structured
    :class:`~attnres_lens.selection.SweepUnit` behind each row) and ``undefined`` (the rows
    whose intervention is undefined: NaN rows)."""

    effects: Effects

    @property
    def table(self) -> pd.DataFrame:
        return self.effects.sweep_table()

    @property
    def units(self) -> list[SweepUnit]:
        return list(self.effects.units)

    @property
    def undefined(self) -> tuple[int, ...]:
        return self.effects.undefined


@dataclass
class SweepSettings:
    """What one batch of a sweep needs besides its :class:`SweepSpec`: the spec's values with
    the batch's shape applied (the positions intervened on, the minibatch size)."""

    mode: str
    target: Optional[str]
    factor: Optional[float]
    seed: int
    metric: Metric
    positions: IndexSelector
    intervened_positions: list[int]
    batch_size: int
    engine: str
    max_batch_tokens: Optional[int]
    progress: bool

    def intervention(self, unit: SweepUnit, value: Any) -> Intervention:
        return Intervention(unit.where, self.mode, target=self.target, value=value,
                            positions=self.positions, seed=self.seed)


def _positive_int_or_none(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


@dataclass(frozen=True, eq=False)
class SweepSpec:
    """What to sweep and how, validated once, when it is made (see
    :func:`~attnres_lens.patching.sweep_sources` for each field). ``metric`` is held resolved
    (a :class:`~attnres_lens.metrics.Metric`) and ``target`` with its default applied
    (``"weight"`` for the replacing modes). Checks that need the tokens (positions in range,
    ``"loss"`` needs 2 positions, resampling needs 2 prompts per minibatch) run per batch."""

    mode: str = "zero"
    metric: Any = "loss"
    groups: Any = "slice"
    positions: Any = None
    batch_size: Optional[int] = None
    engine: str = "batched"
    bands: Any = None
    target: Optional[str] = None
    factor: Optional[float] = None
    seed: int = 0
    routers: Optional[Sequence[str]] = None
    merge_duplicates: bool = True
    max_batch_tokens: Optional[int] = None
    reference: Any = None
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; valid modes: {MODES}")
        if not isinstance(self.engine, str) or self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; valid: {ENGINES}")
        object.__setattr__(self, "target", _check_target_and_factor(self.mode, self.target, self.factor))
        object.__setattr__(self, "metric", Metric.resolve(self.metric))
        as_index("positions", self.positions)
        _positive_int_or_none("batch_size", self.batch_size)
        _positive_int_or_none("max_batch_tokens", self.max_batch_tokens)
        if not isinstance(self.merge_duplicates, bool):
            raise TypeError(f"merge_duplicates must be a bool, got {self.merge_duplicates!r}")

    def replace(self, **changes: Any) -> "SweepSpec":
        """This spec with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def manifest(self) -> dict[str, Any]:
        """The settings that identify a sweep's results (a checkpoint's manifest)."""
        fields = ("mode", "groups", "positions", "batch_size", "engine", "bands", "target", "factor", "seed",
                  "routers", "merge_duplicates", "max_batch_tokens")
        return {**{name: getattr(self, name) for name in fields}, "metric": self.metric.name}

    def for_batch(self, tokens: Tensor, metric: Optional[Metric] = None, progress: Optional[bool] = None) -> SweepSettings:
        """The settings of one batch of ``tokens`` (with ``metric``: the spec's metric restricted to it)."""
        metric = self.metric if metric is None else metric
        n_prompts, n_pos = tokens.shape
        if metric.fn == "loss" and n_pos < 2:
            raise ValueError("metric 'loss' needs at least 2 positions (it scores next-token predictions)")
        selector = as_index("positions", self.positions)
        intervened = select_indices("positions", selector, n_pos, "sweep_sources(positions=...)")
        return SweepSettings(self.mode, self.target, self.factor, self.seed, metric, selector, intervened,
                             n_prompts if self.batch_size is None else self.batch_size, self.engine,
                             self.max_batch_tokens, self.progress if progress is None else progress)


@dataclass(frozen=True, eq=False)
class SweepPlan:
    """A :class:`SweepSpec` resolved on one model: the units to sweep, in row order, and
    their grouping kind."""

    model: HookedAttnResTransformer
    spec: SweepSpec
    units: tuple[SweepUnit, ...]
    grouping: str


def plan(model: HookedAttnResTransformer, spec: SweepSpec) -> SweepPlan:
    """The units ``spec`` sweeps on ``model`` (groups, bands, routers and duplicates resolved)."""
    if not isinstance(model, HookedAttnResTransformer):
        raise TypeError(f"model must be a HookedAttnResTransformer, got {type(model).__name__}")
    if not isinstance(spec, SweepSpec):
        raise TypeError(f"spec must be a SweepSpec, got {type(spec).__name__}")
    units = sweep_units(model, spec.groups, spec.bands, spec.routers, spec.merge_duplicates)
    return SweepPlan(model, spec, tuple(units), grouping_kind(spec.groups))


@runtime_checkable
class Executor(Protocol):
    """Runs a plan on batches of prompts: :class:`Local` here, ``Sharded(checkpoint_dir)`` in
    :mod:`attnres_lens.sweep_sharded` (ranks of a process group, checkpoints)."""

    def run(self, plan: SweepPlan, batches: list[Tensor]) -> Effects: ...


@dataclass(frozen=True)
class Local:
    """Every batch in this process, one after the other."""

    def run(self, plan: SweepPlan, batches: list[Tensor]) -> Effects:
        parts, offset = [], 0
        for tokens in batches:
            n_prompts = int(tokens.shape[0])
            metric = plan.spec.metric.for_prompts(torch.arange(offset, offset + n_prompts)) if len(batches) > 1 else None
            parts.append(measure(plan, tokens, metric=metric))
            offset += n_prompts
        return Effects.concat(parts)


def execute(plan: SweepPlan, batches: Any, executor: Optional[Executor] = None) -> Effects:
    """Run ``plan`` on ``batches`` (a ``[batch, pos]`` token tensor or a list of them; a
    metric with per-prompt data indexes the prompts of all batches in order) with ``executor``
    (default :class:`Local`): one :class:`~attnres_lens.effects.Effects` over every prompt."""
    batches = [batches] if isinstance(batches, Tensor) else list(batches)
    if not batches:
        raise ValueError("execute needs at least one batch of tokens")
    batches = [plan.model.validate_tokens(tokens) for tokens in batches]
    return (Local() if executor is None else executor).run(plan, batches)


def execute_prompts(plan: SweepPlan, prompts: Any, attention_mask: Optional[Tensor] = None,
                    executor: Optional[Executor] = None) -> Effects:
    """:func:`execute` on one batch of prompts that may be padded: ``[batch, pos]`` tokens with
    their ``attention_mask`` (1 = real token), or strings (whose mask ``to_tokens`` derives).
    The prompts are unpadded and grouped by length (:func:`~attnres_lens.sequence.prompts_by_length`),
    the groups run as batches (a metric with per-prompt data follows its prompts), and the
    per-prompt values come back in input order: each equals the prompt run alone."""
    groups = prompts_by_length(plan.model, prompts, attention_mask)
    if len(groups) == 1:
        return execute(plan, groups[0].tokens, executor)
    spec = plan.spec
    if spec.mode == "patch" or (spec.mode in ("mean", "resample") and spec.reference is None):
        raise ValueError(
            f"mode {spec.mode!r}{'' if spec.mode == 'patch' else ' without reference='} reads the other prompts of "
            f"one [batch, pos] batch, but these prompts have {len(groups)} lengths "
            f"({sorted(int(g.tokens.shape[1]) for g in groups)}); sweep prompts of one length at a time"
            + ("" if spec.mode == "patch" else " or pass reference=")
        )
    rows = [row for group in groups for row in group.rows]
    spec = spec.replace(metric=spec.metric.for_prompts(torch.tensor(rows)))
    effects = execute(dataclasses.replace(plan, spec=spec), [group.tokens for group in groups], executor)
    return effects.take_prompts(np.argsort(rows, kind="stable").tolist())


def measure(plan: SweepPlan, tokens: Tensor, *, metric: Optional[Metric] = None, unit_indices: Optional[Sequence[int]] = None,
            progress: Optional[bool] = None) -> Effects:
    """One batch of ``plan`` (only the units ``unit_indices``, in that order, if given: the
    work items of a sharded or resumed sweep)."""
    model, spec = plan.model, plan.spec
    tokens = model.validate_tokens(tokens)
    settings = spec.for_batch(tokens, metric, progress)
    _check_resample_batches(settings, tokens.shape[0], spec.reference)
    units = list(plan.units) if unit_indices is None else [plan.units[i] for i in unit_indices]
    reference_values = _reference_values(model, settings, spec.reference, tokens, units)
    undefined = _undefined_units(model, settings, units, reference_values)
    clean, mass, ablated = _measure(model, tokens, settings, units, undefined, reference_values)
    return Effects(
        units=tuple(units), grouping=plan.grouping, mass=mass, effect=ablated - clean[None, :], clean=clean,
        undefined=undefined,
        settings=dict(mode=settings.mode, target=settings.target, metric=settings.metric.name, engine=settings.engine),
    )


def _check_target_and_factor(mode: str, target: Optional[str], factor: Optional[float]) -> Optional[str]:
    """The target the mode acts on (``"weight"`` by default for replacing modes)."""
    if mode in REPLACING_MODES:
        target = "weight" if target is None else target
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; valid targets: {TARGETS}")
    elif target is not None:
        raise ValueError(f"target= applies to modes {REPLACING_MODES}, not to {mode!r}")
    if mode == "scale" and factor is None:
        raise ValueError("mode 'scale' needs factor=")
    if mode != "scale" and factor is not None:
        raise ValueError(f"factor= applies to mode 'scale', not to {mode!r}")
    return target


def _check_resample_batches(settings: SweepSettings, n_prompts: int, reference: Any) -> None:
    batch_size = settings.batch_size
    smallest = n_prompts - (math.ceil(n_prompts / batch_size) - 1) * batch_size
    if settings.mode == "resample" and reference is None and smallest < 2:
        raise ValueError(
            f"resampling within the batch needs minibatches of at least 2 prompts, but {n_prompts} "
            f"prompts in minibatches of {batch_size} leave one of {smallest}; change batch_size or "
            "pass reference="
        )


def _reference_values(
    model: HookedAttnResTransformer, settings: SweepSettings, reference: Any, tokens: Tensor, units: list[SweepUnit]
) -> Any:
    """The value every intervention of the sweep carries: the factor, or the reference activations."""
    if settings.mode == "scale":
        return settings.factor
    names = []
    if settings.mode in REPLACING_MODES:
        for spec in {spec.name: spec for unit in units for spec, _ in unit.touched}.values():
            names += [f"{spec.name}.hook_{what}" for what in HOOKS_OF_TARGET[settings.target]]
    values = _prepare_reference(model, settings.mode, reference, tokens, names, settings.batch_size)
    if settings.mode == "patch":
        n_prompts = tokens.shape[0]
        for name, t in values.items():
            if t.ndim < 1 or t.shape[0] not in (n_prompts, 1):
                raise ValueError(
                    f"patch reference {name} has batch {t.shape[0] if t.ndim else None}, but "
                    f"{n_prompts} prompts are swept: it must be {n_prompts} (or 1)"
                )
    return values


def _undefined_units(
    model: HookedAttnResTransformer, settings: SweepSettings, units: list[SweepUnit], value: Any
) -> tuple[int, ...]:
    """Units whose intervention is undefined (masking every source of a router), with a warning."""
    undefined = []
    memo = ReferenceMemo()
    for i, unit in enumerate(units):
        try:
            compile_interventions(model, [settings.intervention(unit, value)], memo=memo)
        except MaskAllSourcesError:
            undefined.append(i)
    if undefined:
        warnings.warn(
            f"{len(undefined)} rows mask every source of a router (undefined: nothing left to route "
            f"to); their metric_ablated and effect are NaN: {[units[i].label for i in undefined][:6]}",
            UndefinedInterventionWarning,
            stacklevel=4,
        )
    return tuple(undefined)


def _measure(
    model: HookedAttnResTransformer,
    tokens: Tensor,
    settings: SweepSettings,
    units: list[SweepUnit],
    undefined: tuple[int, ...],
    value: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The clean metric ``[prompt]``, the mass and the ablated metric ``[unit, prompt]``, by minibatch."""
    n_prompts = tokens.shape[0]
    ablated = np.full((len(units), n_prompts), np.nan)
    mass = np.full((len(units), n_prompts), np.nan)
    clean_values = np.zeros(n_prompts)
    n_batches = math.ceil(n_prompts / settings.batch_size)
    bar = tqdm(total=len(units) * n_batches, disable=not settings.progress, desc="sweep_sources")
    try:
        for start in range(0, n_prompts, settings.batch_size):
            rows = slice(start, min(start + settings.batch_size, n_prompts))
            minibatch_value = value
            if settings.mode == "patch":
                minibatch_value = {n: (t if t.shape[0] == 1 else t[rows]) for n, t in value.items()}
            clean_values[rows], mass[:, rows], results = _measure_minibatch(
                model, tokens, rows, settings, units, undefined, minibatch_value, bar
            )
            for i, values in results.items():
                ablated[i, rows] = values.cpu().double().numpy()
            bar.update(len(undefined))
    finally:
        bar.close()
    return clean_values, mass, ablated


def _measure_minibatch(
    model: HookedAttnResTransformer,
    tokens: Tensor,
    rows: slice,
    settings: SweepSettings,
    units: list[SweepUnit],
    undefined: tuple[int, ...],
    value: Any,
    bar: Any,
) -> tuple[np.ndarray, np.ndarray, dict[int, Tensor]]:
    minibatch = tokens[rows]
    metric = settings.metric.for_prompts(torch.arange(rows.start, rows.stop))
    clean = clean_pass(model, minibatch)
    clean_log_probs = F.log_softmax(clean.logits.float(), dim=-1) if metric.fn == "kl" else None
    clean_values = metric(clean.logits, minibatch, clean_log_probs).cpu().double().numpy()
    # mass is read where the metric reads, among the intervened positions
    intervened = settings.intervened_positions
    read = sorted(set(metric.read_positions(minibatch.shape[1])) & set(intervened)) or intervened
    mass = np.stack([_mass(clean.weights, unit.touched, read).cpu().double().numpy() for unit in units])
    interventions = {i: settings.intervention(units[i], value) for i in range(len(units)) if i not in undefined}
    if settings.engine == "naive":
        results = run_naive(model, minibatch, interventions, metric, clean_log_probs, bar)
    else:
        budget = settings.max_batch_tokens or default_budget(model, minibatch.numel())
        n_pos = minibatch.shape[1]
        reruns = [Rerun(i, iv, units[i].start, first_position(iv, n_pos)) for i, iv in interventions.items()]
        results = run_batched(model, minibatch, reruns, metric, clean, clean_log_probs, budget, bar)
    return clean_values, mass, results


def _mass(weights: dict[str, Tensor], touched: Touched, read: list[int]) -> Float[Tensor, " batch"]:
    """Per prompt: per router the summed weight of the touched sources (mean over ``read``), then the mean over routers."""
    per_router = []
    for spec, sources in touched:
        w = weights[spec.name]  # [batch, pos, source]
        p = torch.tensor(read, device=w.device)
        s = torch.tensor(sources, device=w.device)
        per_router.append(w[:, p][:, :, s].float().sum(dim=-1).mean(dim=-1))
    return torch.stack(per_router).mean(dim=0)


__all__ = [
    "ENGINES",
    "Executor",
    "Local",
    "NonFiniteMetricWarning",
    "SweepPlan",
    "SweepResult",
    "SweepSettings",
    "SweepSpec",
    "UndefinedInterventionWarning",
    "execute",
    "execute_prompts",
    "measure",
    "plan",
    "warn_if_not_finite",
]
