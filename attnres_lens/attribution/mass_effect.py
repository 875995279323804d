"""Mass vs effect: the exact sweep, then bootstrap, flags, rank correlations, largest rows and
gradient agreement, each a named step of :func:`mass_vs_effect`."""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..effects import Effects
from ..metrics import Metric
from ..names import GROUPINGS
from ..selection import (
    DESCRIPTION_KEYS,
    BandsLike,
    Group,
    SweepUnit,
    band_of,
    copies_of,
    duplicate_of,
    duplicate_pairs,
    group_from_description,
    resolve_bands,
    resolve_positions,
    resolve_where,
    slice_pairs,
)
from .bootstrap import CI_METHODS, Interval, bootstrap_statistics, check_bootstrap_size, kendall_columns, spearman_columns
from .data import prompt_batches
from .exact import sweep_batches
from .screen import SCREEN_ENGINES, add_screen_columns as _add_screen_columns, screened_sweep
from .gradients import gradient_rows
from .report import MassEffectReport
from .routing_stats import RoutingAccumulator, RoutingStatistics, accumulate_routing
from .tables import is_missing, router_label, row_name
from .thresholds import (
    DEFAULT_EFFECT_THRESHOLD,
    DEFAULT_LOW_MASS_THRESHOLD,
    DEFAULT_MASS_THRESHOLD,
    FLAG_CAUSAL_WITHOUT_MASS,
    FLAG_COMPENSATED_BY_DUPLICATE,
    FLAG_MASS_WITHOUT_CAUSAL_ROLE,
)

if TYPE_CHECKING:  # annotations only
    from ..model import HookedAttnResTransformer


@dataclass(frozen=True)
class Thresholds:
    """When a row carries appreciable mass (``mass``), little mass (``low_mass``), and a
    practically relevant effect (``effect``, metric units)."""

    mass: float
    low_mass: float
    effect: float

    def __post_init__(self) -> None:
        for name, value in (("mass_threshold", self.mass), ("low_mass_threshold", self.low_mass)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if self.low_mass > self.mass:
            raise ValueError(f"low_mass_threshold={self.low_mass} must not exceed mass_threshold={self.mass}")
        if not self.effect >= 0.0:
            raise ValueError(f"effect_threshold must be >= 0 (metric units), got {self.effect!r}")


@dataclass
class Rows:
    """The defined sweep rows and what the statistics need of each."""

    effects: Effects  # the defined rows' per-prompt mass and effect
    units: list[SweepUnit]
    bands: list[Optional[str]]  # each row's depth band (None: several, or the final router)
    eligible: np.ndarray  # False for structural rows (mass fixed by construction)
    kind_rows: dict[str, np.ndarray]  # the eligible rows of each sublayer kind ("attn", "mlp")
    structural: list[str]  # per row, why its mass is fixed by construction ("" when it is not)


def mass_vs_effect(
    model: "HookedAttnResTransformer",
    tokens_or_batches: Any,
    *,
    groups: Any = "slice",
    mode: str = "zero",
    metric: Any = "loss",
    n_boot: int = 200,
    seed: int = 0,
    confidence: float = 0.95,
    ci_method: str = "percentile",
    mass_threshold: float = DEFAULT_MASS_THRESHOLD,
    low_mass_threshold: float = DEFAULT_LOW_MASS_THRESHOLD,
    effect_threshold: float = DEFAULT_EFFECT_THRESHOLD,
    bands: BandsLike = None,
    positions: Optional[Sequence[int]] = None,
    batch_size: Optional[int] = None,
    engine: str = "batched",
    gradient: bool = True,
    progress: bool = False,
    top_k: int = 5,
    checkpoint_dir: Any = None,
    merge_duplicates: bool = True,
    screen_k: Optional[int] = None,
    screen_control: Optional[int] = None,
    attention_mask: Optional[Tensor] = None,
) -> MassEffectReport:
    """Compare routing mass with causal effect, slice by slice (or group by group).

    Runs the exact sweep (:func:`attnres_lens.patching.sweep_sources` with ``mode``,
    ``metric``, ``groups``, ``bands``, ``positions``, ``batch_size``, ``engine``) on every batch
    of ``tokens_or_batches`` (a token tensor, a list of token tensors, or text), then
    bootstraps over prompts with ``scipy.stats.bootstrap`` (``n_boot`` resamples, ``seed``,
    ``confidence``, ``ci_method``): the mean mass and mean effect of every row, the rank
    correlations between mass and ``|effect|``, and whether the largest-mass row of each
    sublayer kind is also the largest-effect row. All statistics share the same resamples.

    Flags (only rows of routers with more than one source):

    - :data:`FLAG_MASS_WITHOUT_CAUSAL_ROLE`: ``mass >= mass_threshold`` and the effect's CI
      includes 0 or ``|effect| < effect_threshold``;
    - :data:`FLAG_CAUSAL_WITHOUT_MASS`: ``mass < low_mass_threshold``, the effect's CI excludes 0
      and ``|effect| >= effect_threshold``.

    Duplicates: with ``merge_duplicates`` (default) the copies of one tensor at a router
    (``model.source_table()["duplicate_of"]``) are one row, as in ``sweep_sources``. With
    ``merge_duplicates=False`` every copy is its own row, and each copy whose merged slice has
    a practically relevant effect that this copy alone does not reach half of is flagged
    :data:`FLAG_COMPENSATED_BY_DUPLICATE` (column ``merged_effect``: the effect of intervening
    on every copy, from one extra sweep row per pair). ``settings["duplicates"]`` says how many
    pairs there are and where.

    Engines: ``"batched"`` (default) and ``"naive"`` run the exact sweep on every row.
    ``"estimate"`` runs none: every row's effect is :func:`estimate_effects`' ``"readout"``
    estimate (modes zero, mask). ``"screen"`` ranks every row with that estimate, computes
    exactly the ``screen_k`` rows of largest estimated ``|effect|`` (default ``max(top_k + 1,
    5% of the rows)``) and a seeded random control subset of ``screen_control`` other rows
    (default ``max(3, screen_k // 2)``), all in one batched run per minibatch that starts from
    the estimate's own clean forward, and keeps the estimate elsewhere. Column ``exact`` says which rows were
    measured and ``estimate`` holds every row's estimate; ``settings["screen"]`` lists the
    control rows the estimator missed (their exact ``|effect|`` would have put them in the
    top ``screen_k``) and a bound on how many such rows the unmeasured rest may hold (AtP*'s
    control-subset argument: with ``m`` misses among ``c`` uniformly drawn rows, a 95% upper
    bound on the miss rate, times the unmeasured rows).

    Defaults: ``mass_threshold=0.2``, ``low_mass_threshold=0.05``, ``effect_threshold=0.01``
    (metric units: nats per token for ``"loss"``, about a 1% perplexity change).

    With ``gradient=True`` (modes ``"zero"`` and ``"mask"``), also computes
    :func:`gradient_attribution`'s estimate of the same intervention for every row (one forward
    and one backward per batch) and compares it with the exact effect. The same pass feeds
    :func:`routing_statistics` (``report.routing``).

    With ``checkpoint_dir``, every finished sweep unit is recorded there and a rerun with the
    same model, tokens and arguments recomputes only what is missing; under an initialised
    ``torch.distributed`` process group (``torchrun``) the sweep and the routing statistics are
    shared across the ranks and gathered, and every rank returns the same report
    (``docs/scale.md``).

    Padding: a padded ``[batch, pos]`` tensor takes its ``attention_mask`` (1 = real token; a
    list of strings derives it). Its prompts are unpadded and grouped by length (in order of
    first appearance), and every prompt is measured on its real tokens alone, so each row's
    mass and effect are means over prompts of the values the prompts have run one by one; the
    bootstrap resamples the prompts in that grouped order.

    Raises ``ValueError`` for an empty dataset, too few prompts for a bootstrap (at least
    :func:`min_prompts_for_bootstrap` ``(confidence)``, 4 at 95%), groups naming unknown
    families or bands, and a metric that is not finite for some slice (named).
    """
    started = time.perf_counter()
    batches, prompt_rows = prompt_batches(model, tokens_or_batches, attention_mask)
    n_prompts = sum(int(b.shape[0]) for b in batches)
    if ci_method not in CI_METHODS:
        raise ValueError(f"ci_method must be one of {CI_METHODS}, got {ci_method!r}")
    thresholds = Thresholds(mass_threshold, low_mass_threshold, effect_threshold)
    engines = ("batched", "naive") + SCREEN_ENGINES
    if not isinstance(engine, str) or engine not in engines:
        raise ValueError(f"unknown engine {engine!r}; valid: {engines}")
    check_bootstrap_size(n_prompts, confidence, n_boot)
    resolved_bands = resolve_bands(bands, model.cfg.n_layers)
    resolved_metric = Metric.resolve(metric).for_prompts(torch.tensor(prompt_rows))
    timings, clock = {}, time.perf_counter()

    sweep_groups = _sweep_groups(model, groups, resolved_bands)
    screen_info = None
    if engine in SCREEN_ENGINES:
        if checkpoint_dir is not None:
            raise ValueError(f"checkpoint_dir records exact sweeps; engine={engine!r} does not take it (use engine='batched')")
        result, screen_info = screened_sweep(
            model, batches, mode=mode, metric=resolved_metric, groups=sweep_groups, positions=positions,
            batch_size=batch_size, bands=resolved_bands, merge_duplicates=merge_duplicates, engine=engine,
            k=screen_k, control=screen_control, seed=seed, top_k=top_k,
        )
    else:
        result = sweep_batches(
            model, batches, mode=mode, metric=resolved_metric, groups=sweep_groups,
            positions=positions, batch_size=batch_size, engine=engine, bands=resolved_bands, progress=progress,
            merge_duplicates=merge_duplicates, checkpoint_dir=checkpoint_dir,
        )
    rows, undefined_names = _defined_rows(result, resolved_bands, mode, duplicate_of(model.router_specs))
    check_finite(rows.effects)
    merged_effects = None
    if not merge_duplicates:
        exact_engine = "batched" if engine in SCREEN_ENGINES else engine
        merged_effects = _merged_pair_effects(model, batches, rows, mode, resolved_metric, positions, batch_size, exact_engine)
    timings["sweep_s"], clock = time.perf_counter() - clock, time.perf_counter()

    estimate_kind = mode if mode in ("zero", "mask") else None
    if not gradient or resolved_metric.differentiable() is None:
        estimate_kind = None
    gradient_per_prompt, routing = _gradient_and_routing(
        model, batches, resolved_metric, rows, positions, batch_size, resolved_bands, estimate_kind
    )
    timings["gradient_and_routing_s"], clock = time.perf_counter() - clock, time.perf_counter()

    intervals = _bootstrap_rows(rows, gradient_per_prompt, n_boot=n_boot, seed=seed, confidence=confidence, method=ci_method)
    report = _report(model, rows, intervals, routing, thresholds, top_k, estimate_kind,
                     named_groups=not isinstance(groups, str), merged_effects=merged_effects)
    timings["statistics_s"] = time.perf_counter() - clock
    report.settings.update(
        mode=mode,
        metric=resolved_metric.name,
        groups=groups if isinstance(groups, str) else list(groups),
        undefined_rows=undefined_names,
        n_prompts=n_prompts,
        n_tokens=int(sum(b.numel() for b in batches)),
        n_boot=n_boot,
        seed=seed,
        confidence=confidence,
        ci_method=ci_method,
        bands={name: list(layers) for name, layers in resolved_bands.items()},
        positions=resolve_positions(positions, int(batches[0].shape[1])),
        engine=engine,
        duplicates=duplicates_summary(model, merge_duplicates, report.table),
    )
    if screen_info is not None:
        report.settings["screen"] = screen_info
        _add_screen_columns(report, result)
    report.timings = {**timings, "total_s": time.perf_counter() - started}
    return report


# ============================================================================ duplicates
def duplicates_summary(model: "HookedAttnResTransformer", merged: bool, table: pd.DataFrame) -> dict:
    """How many pairs of copies of one tensor the model's routers read, where, and whether the
    report merged them (``settings["duplicates"]``)."""
    pairs = duplicate_pairs(model)
    where = [
        f"{router_label(spec.layer, spec.sublayer)}: " + " = ".join(f"[{i}] {spec.sources[i].label}" for i in copies)
        for spec, copies in pairs
    ]
    out = {"merged": merged, "n_pairs": len(pairs), "where": where}
    if not merged:
        out["n_compensated"] = int((table["flag"] == FLAG_COMPENSATED_BY_DUPLICATE).sum())
    return out


def _merged_pair_effects(
    model: "HookedAttnResTransformer", batches: list[torch.Tensor], rows: Rows, mode: str, metric: Metric,
    positions: Any, batch_size: Optional[int], engine: str,
) -> dict[tuple[str, int], float]:
    """Per-copy reports: the effect of intervening on every copy of each duplicated slice row,
    keyed by each copy's ``(router, source)`` (one extra sweep row per pair)."""
    duplicates = duplicate_of(model.router_specs)
    groups: dict[str, list[tuple[str, int]]] = {}
    for unit in rows.units:
        if unit.source is None or not unit.n_copies or unit.n_copies < 2:
            continue
        copies = copies_of(duplicates[unit.router], unit.source)
        groups[f"{unit.router}: {copies}"] = [(unit.router, i) for i in copies]
    if not groups:
        return {}
    result = sweep_batches(model, batches, mode=mode, metric=metric, groups=groups, positions=positions,
                           batch_size=batch_size, engine=engine, bands=None, progress=False)
    out = {}
    for unit, effect in zip(result.units, result.effects.mean_effect()):
        for router, source in unit.slices:
            out[(router, source)] = float(effect)
    return out


def _compensated(table: pd.DataFrame, merged_effects: dict, thresholds: Thresholds) -> tuple[np.ndarray, np.ndarray]:
    """Each row's merged-pair effect (NaN for rows that are not a copy) and whether it is
    compensated: the merged slice's ``|effect| >= effect_threshold`` while this copy's
    ``|effect|`` is under half of it."""
    merged = np.array([
        merged_effects.get((router, int(source)), np.nan) if not is_missing(source) else np.nan
        for router, source in zip(table["router"], table["source"])
    ], dtype=float)
    with np.errstate(invalid="ignore"):
        compensated = (np.abs(merged) >= thresholds.effect) & (table["abs_effect"].to_numpy() < 0.5 * np.abs(merged))
    return merged, compensated


# ============================================================================ rows
def _sweep_groups(model: "HookedAttnResTransformer", groups: Any, bands: Mapping[str, tuple[int, ...]]) -> Any:
    """What to pass to the sweep's ``groups=``: a scheme name, or a mapping name -> slices.

    A mapping's values are either lists of ``(router, source)`` pairs (as in ``sweep_sources``)
    or descriptions ``{"family": ..., "sublayer": ..., "band": ..., "layers": ...}``."""
    if isinstance(groups, str):
        if groups not in GROUPINGS:
            raise ValueError(f"unknown groups {groups!r}; valid: {GROUPINGS} or a mapping name -> group")
        return groups
    if not isinstance(groups, Mapping) or not groups:
        raise ValueError(
            f"groups must be one of {GROUPINGS} or a non-empty mapping name -> group (a list of "
            f"(router, source) pairs or a description with keys {DESCRIPTION_KEYS}); got {groups!r}"
        )
    resolved: dict[str, list[tuple[str, int]]] = {}
    for name, group in groups.items():
        if not isinstance(name, str):
            raise TypeError(f"group names must be str, got {name!r}")
        if isinstance(group, Mapping):
            where = group_from_description(name, group, bands, model.cfg.n_layers)
        else:
            where = Group(slices=tuple(group), label=name)
        resolved[name] = slice_pairs(resolve_where(model, where))
    return resolved


def _defined_rows(
    result: Any, bands: Mapping[str, tuple[int, ...]], mode: str, duplicates: Mapping[str, Sequence[Optional[int]]]
) -> tuple[Rows, list[str]]:
    """The rows whose intervention is defined (with their bands and eligibility), and the names
    of the others (masking every source of a router)."""
    undefined = set(result.undefined)
    keep = [i for i in range(len(result.units)) if i not in undefined]
    names = result.effects.table()
    undefined_names = [row_name(names.iloc[i]) for i in sorted(undefined)]
    if not keep:
        raise ValueError(f"no row left to report: every row's {mode!r} intervention is undefined")
    effects = result.effects.subset(keep)
    units = list(effects.units)
    structural = [structural_reason(unit, duplicates) for unit in units]
    eligible = np.array([not why for why in structural], dtype=bool)
    sublayers = np.array([unit.sublayer for unit in units], dtype=object)
    kind_rows = {kind: np.flatnonzero(eligible & (sublayers == kind)) for kind in ("attn", "mlp")}
    kind_rows = {kind: members for kind, members in kind_rows.items() if len(members)}
    row_bands = [_row_band(unit, bands) for unit in units]
    return Rows(effects, units, row_bands, eligible, kind_rows, structural), undefined_names


#: Why a structural row's mass is fixed by construction (``table["structural_reason"]``).
STRUCTURAL_ONLY_SOURCE = "its router's only source: mass 1 by construction"
STRUCTURAL_ONE_TENSOR = "every source of its router is this one tensor (copies merged): mass 1 by construction"
STRUCTURAL_ALL_SOURCES = "every source of its router: mass 1 by construction"
STRUCTURAL_COPY = ("a copy of the tensor every other source of its router holds: identical keys, so the copies "
                   "split the mass in a fixed ratio (only a recency bias tells them apart)")


def structural_reason(unit: SweepUnit, duplicates: Mapping[str, Sequence[Optional[int]]]) -> str:
    """Why ``unit``'s mass is fixed by construction, or ``""`` when it is a routing decision.

    It is fixed when at every router the row touches, its sources with their copies (the same
    tensor, :func:`duplicate_of`) are all of the router's sources: the softmax then gives them
    mass 1, or, for one copy among copies, a fixed share (identical keys give identical logits
    but for a recency bias)."""
    reasons = set()
    for spec, sources in unit.touched:
        covered = {copy for source in sources for copy in copies_of(duplicates[spec.name], source)}
        if len(covered) < spec.n_sources:
            return ""
        if spec.n_sources == 1:
            reasons.add(STRUCTURAL_ONLY_SOURCE)
        elif len(set(sources)) < spec.n_sources:
            reasons.add(STRUCTURAL_COPY)
        elif len(copies_of(duplicates[spec.name], sources[0])) == spec.n_sources:
            reasons.add(STRUCTURAL_ONE_TENSOR)
        else:
            reasons.add(STRUCTURAL_ALL_SOURCES)
    return "; ".join(sorted(reasons))


def _row_band(unit: SweepUnit, bands: Mapping[str, tuple[int, ...]]) -> Optional[str]:
    """A family_band row's own band; otherwise the band all its routers share (else ``None``)."""
    if unit.band is not None:
        return unit.band
    found = {band_of(spec, bands) for spec, _ in unit.touched}
    return found.pop() if len(found) == 1 else None


def check_finite(effects: Effects) -> None:
    """Refuse a metric that is not finite on the clean run or after some ablation (named)."""
    if not np.all(np.isfinite(effects.clean)):
        prompts = np.flatnonzero(~np.isfinite(effects.clean)).tolist()
        raise ValueError(
            f"the metric is not finite on the clean run (prompt(s) {prompts[:10]}); a metric must "
            "return finite values"
        )
    table = effects.table()
    for row, values in enumerate(effects.effect):
        bad = ~np.isfinite(values)
        if bad.any():
            prompts = np.flatnonzero(bad).tolist()
            unit = effects.units[row]
            raise ValueError(
                f"the metric is not finite after ablating {row_name(table.iloc[row])} (router="
                f"{unit.router!r}, source={unit.source!r}, family={unit.family!r}, label={unit.label!r}) "
                f"on prompt(s) {prompts[:10]} (value {values[bad][0]}); a metric must return finite "
                "values for every slice"
            )


def _gradient_and_routing(
    model: "HookedAttnResTransformer",
    batches: list[torch.Tensor],
    metric: Metric,
    rows: Rows,
    positions: Any,
    batch_size: Optional[int],
    bands: Mapping[str, tuple[int, ...]],
    estimate_kind: Optional[str],
) -> tuple[Optional[np.ndarray], RoutingStatistics]:
    """The gradient estimate of every row ``[row, prompt]`` (``None`` without one) and the
    routing statistics, from one forward (and backward) per batch."""
    accumulator = RoutingAccumulator(model, bands)
    if estimate_kind is None:
        accumulate_routing(model, batches, batch_size, accumulator)
        return None, accumulator.finish()
    members = [unit.slices for unit in rows.units]
    estimates = gradient_rows(model, batches, metric, members, positions, batch_size, accumulator, kinds=(estimate_kind,))
    return estimates[estimate_kind], accumulator.finish()


# ============================================================================ statistics
def _bootstrap_rows(rows: Rows, gradient_per_prompt: Optional[np.ndarray], **settings: Any) -> dict[str, Interval]:
    """Bootstrap intervals of every row's ``mass``, ``effect`` (and ``gradient``), and of the
    ``spearman``/``kendall`` correlations and ``same_{kind}`` largest-row agreements."""
    per_prompt = {
        "mass": rows.effects.mass,
        "effect": rows.effects.effect,
    }
    if gradient_per_prompt is not None:
        per_prompt["gradient"] = gradient_per_prompt
    eligible = np.flatnonzero(rows.eligible)

    def rank_statistics(means: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        mass, abs_effect = means["mass"], np.abs(means["effect"])
        out = {
            "spearman": spearman_columns(mass[eligible], abs_effect[eligible]),
            "kendall": kendall_columns(mass[eligible], abs_effect[eligible]),
        }
        for kind, members in rows.kind_rows.items():
            kind_mass, kind_effect = mass[members], abs_effect[members]
            top = kind_mass >= kind_mass.max(0) - 1e-12  # rows tied for the largest mass
            out[f"same_{kind}"] = top[kind_effect.argmax(0), np.arange(kind_mass.shape[1])].astype(float)
        return out

    return bootstrap_statistics(per_prompt, rank_statistics, **settings)


def _report(
    model: "HookedAttnResTransformer",
    rows: Rows,
    intervals: dict[str, Interval],
    routing: RoutingStatistics,
    thresholds: Thresholds,
    top_k: int,
    estimate_kind: Optional[str],
    *,
    named_groups: bool,
    merged_effects: Optional[dict] = None,
) -> MassEffectReport:
    table = _results_table(rows, intervals, routing, named_groups)
    table["flag"] = _flag_column(table, thresholds)
    if merged_effects is not None:
        table["merged_effect"], compensated = _compensated(table, merged_effects, thresholds)
        table.loc[compensated, "flag"] = FLAG_COMPENSATED_BY_DUPLICATE
    agreement = None
    if "gradient" in intervals:
        agreement = gradient_agreement(table, rows.eligible, thresholds.effect, top_k, estimate_kind)
    settings = {
        "mass_threshold": thresholds.mass,
        "low_mass_threshold": thresholds.low_mass,
        "effect_threshold": thresholds.effect,
        "metric_clean": float(rows.effects.clean.mean()),
        "gradient_estimate": estimate_kind if "gradient" in intervals else None,
    }
    return MassEffectReport(
        table=table.reset_index(drop=True),
        flags=_flags_table(table, thresholds),
        largest=_largest_rows(table, rows.kind_rows, intervals),
        rank_correlation=_rank_correlation(table, rows.eligible, intervals),
        gradient_agreement=agreement,
        routing=routing,
        sweep=rows.effects.sweep_table(),
        effects=rows.effects,
        settings=settings,
        timings={},
        source_table=model.source_table(),
    )


def _results_table(
    rows: Rows, intervals: dict[str, Interval], routing: RoutingStatistics, named_groups: bool
) -> pd.DataFrame:
    sweep = rows.effects.table()
    table = sweep[[c for c in sweep if c not in ("unit", "band", "undefined", "estimate", "exact")]].copy()
    table.insert(table.columns.get_loc("sublayer") + 1, "band", rows.bands)
    names = list(sweep["label"]) if named_groups else [row_name(r) for _, r in sweep.iterrows()]
    table.insert(0, "name", [str(n) for n in names])
    for column, name in (("mass", "mass"), ("effect", "effect"), ("grad", "gradient")):
        if name not in intervals:
            continue
        interval = intervals[name]
        table["grad_estimate" if column == "grad" else column] = interval.estimate
        table[f"{column}_low"], table[f"{column}_high"] = interval.low, interval.high
        if column == "effect":
            table["abs_effect"] = np.abs(table["effect"])
            table["effect_ci_excludes_zero"] = (table["effect_low"] > 0) | (table["effect_high"] < 0)
    if "gradient" not in intervals:
        table["grad_estimate"] = np.nan
    table["content_dependence"] = _content_dependence(table, routing)
    table["eligible"] = rows.eligible
    table["structural"] = ~rows.eligible
    table["structural_reason"] = rows.structural
    return table


def _content_dependence(table: pd.DataFrame, routing: RoutingStatistics) -> Any:
    """Per slice row, the slice's content dependence (NaN for group rows)."""
    if not ("source" in table and "router" in table and table["source"].notna().all()):
        return np.nan
    by_slice = routing.slices.set_index(["router", "source"])["content_dependence"]
    return [by_slice.get((router, int(source)), np.nan) for router, source in zip(table["router"], table["source"])]


def _flag_column(table: pd.DataFrame, thresholds: Thresholds) -> np.ndarray:
    """Each row's flag ("" for none); only eligible rows are flagged."""
    eligible, excludes_zero = table["eligible"], table["effect_ci_excludes_zero"]
    negligible = table["abs_effect"] < thresholds.effect
    no_role = eligible & (table["mass"] >= thresholds.mass) & (~excludes_zero | negligible)
    causal = eligible & (table["mass"] < thresholds.low_mass) & excludes_zero & ~negligible
    return np.where(no_role, FLAG_MASS_WITHOUT_CAUSAL_ROLE, np.where(causal, FLAG_CAUSAL_WITHOUT_MASS, ""))


def _flag_reason(row: pd.Series, thresholds: Thresholds) -> str:
    interval = f"effect {row['effect']:+.4g} [{row['effect_low']:+.4g}, {row['effect_high']:+.4g}]"
    if row["flag"] == FLAG_COMPENSATED_BY_DUPLICATE:
        return (f"{interval} alone, but {row['merged_effect']:+.4g} intervening on every copy of "
                "its tensor: the other copy undoes it")
    if row["flag"] == FLAG_MASS_WITHOUT_CAUSAL_ROLE:
        why = "CI includes 0" if not row["effect_ci_excludes_zero"] else f"|effect| < {thresholds.effect}"
        return f"mass {row['mass']:.3f} >= {thresholds.mass}; {interval}: {why}"
    return f"mass {row['mass']:.3f} < {thresholds.low_mass}; {interval}, |effect| >= {thresholds.effect}"


_FLAG_COLUMNS = ("name", "router", "layer", "sublayer", "band", "source", "family", "label", "mass",
                 "mass_low", "mass_high", "effect", "effect_low", "effect_high", "flag")


def _flags_table(table: pd.DataFrame, thresholds: Thresholds) -> pd.DataFrame:
    flagged = table.loc[table["flag"] != "", [c for c in table if c in _FLAG_COLUMNS]].copy()
    flagged["reason"] = [_flag_reason(table.loc[i], thresholds) for i in flagged.index]
    return flagged.reset_index(drop=True)


def _rank_correlation(table: pd.DataFrame, eligible: np.ndarray, intervals: dict[str, Interval]) -> dict:
    """Spearman and Kendall between mass and |effect| over the eligible rows: scipy's point
    estimate and p-value, the bootstrap CI."""
    import scipy.stats

    rows = np.flatnonzero(eligible)
    mass, abs_effect = table["mass"].to_numpy()[rows], table["abs_effect"].to_numpy()[rows]
    out: dict = {"n": int(len(rows)), "between": "mass and |effect|"}
    for name, test in (("spearman", scipy.stats.spearmanr), ("kendall", scipy.stats.kendalltau)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = test(mass, abs_effect) if len(rows) > 1 else None
        out[name] = {
            "estimate": float("nan") if result is None else float(result.statistic),
            "low": float(intervals[name].low[0]),
            "high": float(intervals[name].high[0]),
            "pvalue": float("nan") if result is None else float(result.pvalue),
        }
    return out


def _largest_rows(table: pd.DataFrame, kind_rows: dict[str, np.ndarray], intervals: dict[str, Interval]) -> dict:
    """Per sublayer kind: the largest-mass and largest-|effect| rows, and how often they coincide."""
    largest: dict = {}
    for kind, members in kind_rows.items():
        masses = table["mass"].to_numpy()[members]
        tied = members[masses >= masses.max() - 1e-12]
        top_effect = members[int(np.argmax(table["abs_effect"].to_numpy()[members]))]
        top_mass = top_effect if top_effect in tied else tied[0]
        largest[kind] = {
            "largest_mass": table["name"].iloc[top_mass],
            "mass": float(table["mass"].iloc[top_mass]),
            "largest_effect": table["name"].iloc[top_effect],
            "effect": float(table["effect"].iloc[top_effect]),
            "same": bool(top_mass == top_effect),
            "n_tied_for_mass": int(len(tied)),
            "p_same": float(np.nanmean(intervals[f"same_{kind}"].distribution[0])),
        }
    return largest


def gradient_agreement(
    table: pd.DataFrame, eligible: np.ndarray, effect_threshold: float, top_k: int, kind: Optional[str]
) -> dict:
    """How the gradient estimate ranks the eligible rows compared with the exact effect, and
    the rows where they part (a sign flip on a significant effect, or an error above half the
    effect)."""
    import scipy.stats

    rows = table[eligible & table["grad_estimate"].notna().to_numpy()]
    estimate, effect = rows["grad_estimate"].to_numpy(), rows["effect"].to_numpy()

    def correlation(test: Any, x: np.ndarray, y: np.ndarray) -> float:
        if len(rows) < 2:
            return float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(test(x, y).statistic)

    significant = rows["effect_ci_excludes_zero"].to_numpy() & (np.abs(effect) >= effect_threshold)
    same_sign = np.sign(estimate) == np.sign(effect)
    k = min(top_k, len(rows))
    top_exact = set(rows.index[np.argsort(-np.abs(effect))[:k]])
    top_estimate = set(rows.index[np.argsort(-np.abs(estimate))[:k]])
    error = np.abs(estimate - effect)
    return {
        "estimate": kind,
        "n": int(len(rows)),
        "spearman": correlation(scipy.stats.spearmanr, estimate, effect),
        "kendall": correlation(scipy.stats.kendalltau, estimate, effect),
        "spearman_abs": correlation(scipy.stats.spearmanr, np.abs(estimate), np.abs(effect)),
        "sign_agreement": float(same_sign[significant].mean()) if significant.any() else float("nan"),
        "n_significant": int(significant.sum()),
        "top_k": int(k),
        "top_k_overlap": int(len(top_exact & top_estimate)),
        "max_abs_error": float(error.max()) if len(error) else float("nan"),
        "disagreements": _disagreements(rows, significant, same_sign, error, effect_threshold),
    }


def _disagreements(
    rows: pd.DataFrame, significant: np.ndarray, same_sign: np.ndarray, error: np.ndarray, effect_threshold: float
) -> pd.DataFrame:
    effect = rows["effect"].to_numpy()
    bad = (significant & ~same_sign) | (error > np.maximum(effect_threshold, 0.5 * np.abs(effect)))
    out = rows.loc[bad, ["name", "mass", "effect", "effect_low", "effect_high", "grad_estimate"]].copy()
    out["error"] = (out["grad_estimate"] - out["effect"]).to_numpy()
    negligible = np.abs(out["grad_estimate"].to_numpy()) < effect_threshold  # shown as ~0.0000: no sign to differ
    out["why"] = [
        ("estimate ~0 (under the effect threshold)" if small else "sign differs") if (is_significant and not agrees)
        else "off by more than half"
        for is_significant, agrees, small in zip(significant[bad], same_sign[bad], negligible)
    ]
    return out.reindex(out["error"].abs().sort_values(ascending=False).index).reset_index(drop=True)


__all__ = ["Rows", "Thresholds", "check_finite", "gradient_agreement", "mass_vs_effect"]
