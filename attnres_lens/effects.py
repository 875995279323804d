"""Sweep results as one typed value: :class:`Effects`.

An :class:`Effects` holds what a sweep (exact, estimated, screened, sharded) found, per unit
and per prompt: the plan's units (each with a frozen :class:`UnitKey`) and their grouping
kind, ``mass[unit, prompt]``, ``effect[unit, prompt]``, ``clean[prompt]`` (the clean metric),
the units whose intervention is undefined, and the sweep's settings. Everything else is
derived from these arrays:

- :meth:`Effects.table`, the one renderer: a plain ``DataFrame``, one row per unit, with the
  fixed dtypes of :data:`TABLE_DTYPES`, no arrays in cells and nothing in ``.attrs`` (so
  ``astype``, ``concat``, ``merge``, ``groupby``, ``to_parquet`` and ``to_csv`` work on it);
- :meth:`Effects.per_prompt`, the same in long format (one row per unit x prompt);
- :meth:`Effects.concat` (batches of prompts), :meth:`Effects.ranks`, :meth:`Effects.records`
  and :meth:`Effects.from_records` (what a sharded or checkpointed sweep stores per unit).

Joins between results use :attr:`Effects.keys` (one :class:`UnitKey` per unit), never labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import numpy as np
import pandas as pd

from .names import GROUPINGS
from .selection import SweepUnit

#: The grouping kinds of a plan: the named ones of ``sweep_sources(groups=...)`` and ``"named"``
#: (a mapping ``label -> slices``).
GROUPING_KINDS: tuple[str, ...] = (*GROUPINGS, "named")

#: The key columns of every results table, with their dtypes (the same in every table).
KEY_DTYPES: dict[str, Any] = {
    "router": object,
    "layer": "Int64",
    "sublayer": object,
    "source": "Int64",
    "family": object,
    "label": object,
    "n_copies": "Int64",
}
#: The columns of :meth:`Effects.table` and their dtypes (``estimate`` and ``exact`` only when
#: the result carries an estimate).
TABLE_DTYPES: dict[str, Any] = {
    "unit": object,
    "router": object,
    "layer": "Int64",
    "sublayer": object,
    "source": "Int64",
    "family": object,
    "band": object,
    "label": object,
    "n_copies": "Int64",
    "mass": "float64",
    "metric_clean": "float64",
    "metric_ablated": "float64",
    "effect": "float64",
    "undefined": "bool",
}
#: The legacy sweep columns (``sweep_sources``' DataFrame), per-prompt arrays included.
SWEEP_COLUMNS: tuple[str, ...] = (*KEY_DTYPES, "mass", "metric_clean", "metric_ablated", "effect",
                                  "mass_per_prompt", "effect_per_prompt")


@dataclass(frozen=True)
class UnitKey:
    """The identity of one sweep unit, hashable and comparable: ``kind`` (the grouping) and the
    fields that tell its units apart (``None`` where they do not apply; ``name`` only for named
    groups, whose label is their identity)."""

    kind: str
    router: Optional[str] = None
    source: Optional[int] = None
    family: Optional[str] = None
    sublayer: Optional[str] = None
    band: Optional[str] = None
    name: Optional[str] = None

    @classmethod
    def of(cls, unit: SweepUnit, kind: str) -> "UnitKey":
        if kind not in GROUPING_KINDS:
            raise ValueError(f"unknown grouping kind {kind!r}; valid: {GROUPING_KINDS}")
        if kind == "slice":
            return cls(kind, router=unit.router, source=unit.source)
        if kind == "family":
            return cls(kind, router=unit.router, family=unit.family)
        if kind == "family_band":
            return cls(kind, family=unit.family, sublayer=unit.sublayer, band=unit.band)
        return cls(kind, name=unit.label)

    def __str__(self) -> str:
        """A stable text form (the table's ``unit`` column), e.g. ``slice:blocks.0.attn_router:1``."""
        fields = (self.router, self.source, self.family, self.sublayer, self.band, self.name)
        return ":".join([self.kind, *(str(f) for f in fields if f is not None)])


def grouping_kind(groups: Any) -> str:
    """The grouping kind of a ``groups=`` argument (``"named"`` for a mapping)."""
    return groups if isinstance(groups, str) else "named"


def key_frame(units: Sequence[SweepUnit]) -> pd.DataFrame:
    """The key columns of ``units`` with the dtypes of :data:`KEY_DTYPES` (every table's keys)."""
    rows = [unit.keys() for unit in units]
    return pd.DataFrame({column: _column([row[column] for row in rows], dtype) for column, dtype in KEY_DTYPES.items()})


def _column(values: Sequence[Any], dtype: Any) -> pd.Series:
    """A column of ``dtype``; an ``object`` column keeps ``None`` (pandas would infer its
    string dtype, with NaN for ``None``)."""
    if dtype is object:
        return pd.Series(list(values), dtype=object)
    return pd.Series(pd.array(list(values), dtype=dtype) if dtype == "Int64" else values, dtype=dtype)


@dataclass(frozen=True, eq=False)
class Effects:
    """What a sweep found, per unit and prompt (see the module docstring).

    ``mass``, ``effect`` (and ``estimate``) are ``[unit, prompt]`` float64 arrays, ``clean`` is
    ``[prompt]``; rows listed in ``undefined`` are NaN. ``estimate`` and ``exact`` (``[unit]``
    bool) are set by estimating engines: ``effect`` then holds the exact effect where
    ``exact`` and the estimate elsewhere. ``settings``: ``mode``, ``target``, ``metric``,
    ``engine`` (and what else the producer records)."""

    units: tuple[SweepUnit, ...]
    grouping: str
    mass: np.ndarray
    effect: np.ndarray
    clean: np.ndarray
    undefined: tuple[int, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    estimate: Optional[np.ndarray] = None
    exact: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        if self.grouping not in GROUPING_KINDS:
            raise ValueError(f"unknown grouping kind {self.grouping!r}; valid: {GROUPING_KINDS}")
        shape = (len(self.units), len(self.clean))
        for name in ("mass", "effect", "estimate"):
            value = getattr(self, name)
            if value is not None and np.shape(value) != shape:
                raise ValueError(f"Effects.{name} must be [unit, prompt] = {shape}, got {np.shape(value)}")
        object.__setattr__(self, "units", tuple(self.units))
        object.__setattr__(self, "undefined", tuple(int(i) for i in self.undefined))

    # ------------------------------------------------------------------ plan
    @property
    def keys(self) -> tuple[UnitKey, ...]:
        """One frozen key per unit, in row order: what joins between results use."""
        return tuple(UnitKey.of(unit, self.grouping) for unit in self.units)

    @property
    def n_prompts(self) -> int:
        return int(len(self.clean))

    def index_of(self, key: UnitKey) -> int:
        """The row of ``key`` (``KeyError`` naming it if this result has no such unit)."""
        try:
            return self.keys.index(key)
        except ValueError:
            raise KeyError(f"no unit {key} in this result ({len(self.units)} units of kind {self.grouping!r})") from None

    def defined(self) -> "Effects":
        """The units whose intervention is defined (the undefined ones dropped)."""
        return self.subset([i for i in range(len(self.units)) if i not in set(self.undefined)])

    def subset(self, rows: Sequence[int]) -> "Effects":
        """These units (rows, in this order)."""
        rows = [int(i) for i in rows]
        position = {old: new for new, old in enumerate(rows)}
        pick = (lambda a: None if a is None else a[rows])
        return replace(self, units=tuple(self.units[i] for i in rows), mass=self.mass[rows], effect=self.effect[rows],
                       undefined=tuple(position[i] for i in self.undefined if i in position),
                       estimate=pick(self.estimate), exact=pick(self.exact))

    # ------------------------------------------------------------------ batches
    @classmethod
    def concat(cls, parts: Sequence["Effects"]) -> "Effects":
        """Several batches of prompts as one result (the same units in the same order)."""
        if not parts:
            raise ValueError("Effects.concat needs at least one result")
        first = parts[0]
        for part in parts[1:]:
            if part.keys != first.keys:
                raise ValueError("Effects.concat joins batches of one plan: the units differ")
        stack = (lambda name: None if getattr(first, name) is None
                 else np.concatenate([getattr(p, name) for p in parts], axis=1))
        return replace(first, mass=stack("mass"), effect=stack("effect"), estimate=stack("estimate"),
                       clean=np.concatenate([p.clean for p in parts]),
                       undefined=tuple(sorted(set().union(*(p.undefined for p in parts)))))

    def take_prompts(self, order: Sequence[int]) -> "Effects":
        """These prompts (columns, in this order): e.g. the prompts of several batches put back
        in the order of the input they came from."""
        order = [int(i) for i in order]
        pick = (lambda a: None if a is None else a[:, order])
        return replace(self, mass=self.mass[:, order], effect=self.effect[:, order], clean=self.clean[order],
                       estimate=pick(self.estimate))

    # ------------------------------------------------------------------ derived
    def mean_mass(self) -> np.ndarray:
        return self.mass.mean(axis=1)

    def mean_effect(self) -> np.ndarray:
        return self.effect.mean(axis=1)

    def ranks(self, by: str = "abs_effect") -> np.ndarray:
        """Each unit's rank (1 = largest) by ``"abs_effect"``, ``"effect"`` or ``"mass"`` (means
        over prompts; undefined units rank last, ties share the smallest rank)."""
        values = {"abs_effect": np.abs(self.mean_effect()), "effect": self.mean_effect(), "mass": self.mean_mass()}
        if by not in values:
            raise ValueError(f"ranks(by=...) must be one of {tuple(values)}, got {by!r}")
        series = pd.Series(values[by]).rank(ascending=False, method="min", na_option="bottom")
        return series.to_numpy().astype(int)

    def table(self) -> pd.DataFrame:
        """One row per unit: :data:`TABLE_DTYPES` (``estimate``, ``exact`` when estimated);
        means over prompts; a plain DataFrame (no arrays in cells, empty ``.attrs``)."""
        table = key_frame(self.units)
        table.insert(0, "unit", _column([str(k) for k in self.keys], object))
        table.insert(table.columns.get_loc("label"), "band", _column([unit.band for unit in self.units], object))
        with np.errstate(invalid="ignore"):
            table["mass"] = self.mean_mass()
            table["metric_clean"] = float(self.clean.mean())
            table["metric_ablated"] = float(self.clean.mean()) + self.mean_effect()
            table["effect"] = self.mean_effect()
        table["undefined"] = np.array([i in set(self.undefined) for i in range(len(self.units))], dtype=bool)
        table = table[list(TABLE_DTYPES)]
        if self.estimate is not None:
            table["estimate"] = self.estimate.mean(axis=1).astype("float64")
            table["exact"] = np.asarray(self.exact, dtype=bool)
        return table

    def per_prompt(self) -> pd.DataFrame:
        """Long format: one row per unit x prompt with ``unit``, ``prompt``, ``mass``, ``effect``,
        ``metric_clean`` (and ``estimate``); plain dtypes."""
        n_units, n_prompts = self.mass.shape
        out = pd.DataFrame({
            "unit": _column(np.repeat([str(k) for k in self.keys], n_prompts).tolist(), object),
            "prompt": np.tile(np.arange(n_prompts, dtype="int64"), n_units),
            "mass": self.mass.reshape(-1).astype("float64"),
            "effect": self.effect.reshape(-1).astype("float64"),
            "metric_clean": np.tile(self.clean.astype("float64"), n_units),
        })
        if self.estimate is not None:
            out["estimate"] = self.estimate.reshape(-1).astype("float64")
        return out

    def sweep_table(self) -> pd.DataFrame:
        """``sweep_sources``' DataFrame (kept for existing code): :data:`SWEEP_COLUMNS`, with
        the per-prompt arrays ``mass_per_prompt``/``effect_per_prompt`` and ``.attrs`` holding
        ``metric_clean_per_prompt``, ``mode``, ``target``, ``metric`` and ``engine``. Its
        numbers are those of :meth:`table`; prefer that for pandas work."""
        table = key_frame(self.units)
        with np.errstate(invalid="ignore"):
            table["mass"] = self.mean_mass()
            table["metric_clean"] = float(self.clean.mean())
            table["metric_ablated"] = (self.effect + self.clean[None, :]).mean(axis=1)
            table["effect"] = self.mean_effect()
        table["mass_per_prompt"] = [row.copy() for row in self.mass]
        table["effect_per_prompt"] = [row.copy() for row in self.effect]
        if self.estimate is not None:  # an estimating engine's columns
            table["estimate"] = self.estimate.mean(axis=1)
            table["exact"] = np.asarray(self.exact, dtype=bool)
        table.attrs.update(metric_clean_per_prompt=self.clean.copy(),
                           **{k: self.settings.get(k) for k in ("mode", "target", "metric", "engine")})
        return table

    # ------------------------------------------------------------------ records
    def records(self, unit_ids: Optional[Sequence[int]] = None) -> list[dict]:
        """One JSON-able record per unit: ``unit`` (its id in ``unit_ids``, default its row),
        ``unit_key`` (``str`` of its :class:`UnitKey`), ``undefined``, ``clean``, ``mass``,
        ``effect`` (per-prompt lists)."""
        ids = list(range(len(self.units))) if unit_ids is None else [int(i) for i in unit_ids]
        clean = self.clean.astype(float).tolist()
        return [{"unit": ids[row], "unit_key": str(key), "undefined": row in set(self.undefined), "clean": clean,
                 "mass": self.mass[row].astype(float).tolist(), "effect": self.effect[row].astype(float).tolist()}
                for row, key in enumerate(self.keys)]

    @classmethod
    def from_records(cls, units: Sequence[SweepUnit], grouping: str, records: Sequence[Mapping[str, Any]],
                     settings: Mapping[str, Any]) -> "Effects":
        """The result whose :meth:`records` these are (one per unit, in the units' order)."""
        if len(records) != len(units):
            raise ValueError(f"from_records needs one record per unit: {len(records)} records, {len(units)} units")
        keys = [str(UnitKey.of(unit, grouping)) for unit in units]
        for key, record in zip(keys, records):
            if record.get("unit_key", key) != key:
                raise ValueError(f"record for {record['unit_key']!r} where unit {key!r} was expected")
        return cls(units=tuple(units), grouping=grouping,
                   mass=np.array([r["mass"] for r in records], dtype=float).reshape(len(units), -1),
                   effect=np.array([r["effect"] for r in records], dtype=float).reshape(len(units), -1),
                   clean=np.asarray(records[0]["clean"] if records else [], dtype=float),
                   undefined=tuple(i for i, r in enumerate(records) if r["undefined"]), settings=dict(settings))


__all__ = ["Effects", "GROUPING_KINDS", "KEY_DTYPES", "SWEEP_COLUMNS", "TABLE_DTYPES", "UnitKey", "grouping_kind", "key_frame"]
