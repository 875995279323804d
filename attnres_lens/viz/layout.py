"""The cells of a report's heatmaps, computed once for every plotting library.

Pure numpy/pandas (no matplotlib, no plotly): which row and column each unit of a
:class:`~attnres_lens.attribution.MassEffectReport` lands in, the labels, the value and hover
lines of every cell, the colour scale, the cells whose effect CI includes 0, the flagged cells,
and where a merged duplicate sits. ``attribution.plots`` (matplotlib, PNG) and
:mod:`attnres_lens.viz.figures` (plotly, HTML) only draw a :class:`Heatmap`, so the PNG and the
HTML report show the same cells.

Merged duplicates: when the report merges the copies of one tensor at a router
(``settings["duplicates"]["merged"]``, the default), the merged unit sits in its first holder's
column ("emb", "after block k"), in the mass heatmap as in the effect heatmap; the other copy's
cell is left empty and marked ``= <first holder>`` (:attr:`Heatmap.merged`).

The grouping kind (``"slice"``, ``"family"``, ``"family_band"`` or ``"named"``) is passed in or
read from what the report recorded (:func:`report_grouping`), never guessed from its columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pandas as pd

from ..names import GROUPINGS, SUBLAYERS
from ..router import FAMILIES

#: The grouping kinds a heatmap lays out: the sweep's groupings and ``"named"`` (a mapping).
GROUPING_KINDS: tuple[str, ...] = GROUPINGS + ("named",)
#: One colour per source family, shared by every figure (matplotlib and plotly).
FAMILY_COLOURS = {"embedding": "#1f77b4", "current": "#ff7f0e", "history": "#2ca02c"}
#: Heatmap colour maps (names matplotlib and plotly both know).
MASS_COLOURS, EFFECT_COLOURS = "viridis", "RdBu_r"
#: What a colour scale may be: linear, symlog, or chosen from the values.
SCALES = ("auto", "linear", "symlog")

Cell = tuple[int, int]


# ============================================================================ the values
@dataclass(frozen=True)
class ColourScale:
    """``colours`` from ``low`` to ``high``; ``linthresh`` set: symmetric-log, linear within it."""

    colours: str
    low: float
    high: float
    label: str
    linthresh: Optional[float] = None


@dataclass(frozen=True)
class MergedCell:
    """The cell of a copy whose unit is shown under its first holder's column ``into``."""

    cell: Cell
    label: str
    into: str


@dataclass(frozen=True, eq=False)
class Heatmap:
    """One heatmap, ready to draw: ``values[row, column]`` (NaN: no unit there), ``hover`` lines
    and ``notes`` (the number written in a cell) per cell, the colour scale, and the marks."""

    quantity: str
    title: str
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    row_title: str
    column_title: str
    values: np.ndarray
    hover: tuple[tuple[tuple[str, ...], ...], ...]
    notes: tuple[tuple[str, ...], ...]
    colour: ColourScale
    merged: tuple[MergedCell, ...] = ()
    uncertain: tuple[Cell, ...] = ()
    flagged: tuple[tuple[str, tuple[Cell, ...]], ...] = ()

    def cell(self, row: str, column: str) -> Cell:
        """The ``(row, column)`` index of the cell labelled ``row`` x ``column``."""
        return self.rows.index(row), self.columns.index(column)

    def filled(self) -> list[Cell]:
        """The cells holding a value, row by row."""
        return [(int(r), int(c)) for r, c in zip(*np.nonzero(np.isfinite(self.values)))]


# ============================================================================ labels
def is_missing(value: Any) -> bool:
    try:
        return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))
    except TypeError:
        return False


def router_label(layer: Any, sublayer: Any) -> str:
    """``"L3 attn"``, or ``"final"`` for the kimi final router."""
    if sublayer == "final" or is_missing(layer):
        return "final" if sublayer == "final" else str(sublayer)
    return f"L{int(layer)} {sublayer}"


def router_names(source_table: pd.DataFrame) -> dict[str, str]:
    """Router hook prefix -> short label (``"L3 attn"``), in forward order."""
    first = source_table.drop_duplicates("router")
    return {r: router_label(l, s) for r, l, s in zip(first["router"], first["layer"], first["sublayer"])}


def source_columns(source_table: pd.DataFrame) -> list[str]:
    """Source labels in reading order: the embedding, completed sources by first appearance,
    then the in-progress ('current') ones."""
    by_family: dict[str, list[str]] = {f: [] for f in FAMILIES}
    for family, label in zip(source_table["family"], source_table["label"]):
        if label not in by_family[family]:
            by_family[family].append(label)
    columns: list[str] = []
    for family in ("embedding", "history", "current"):
        columns += [label for label in by_family[family] if label not in columns]
    return columns


def report_grouping(report: Any, grouping: Optional[str] = None) -> str:
    """The grouping kind of ``report``'s table: ``grouping`` when given, else the one the report
    recorded (``report.grouping``, or ``settings["groups"]``: a mapping of names is ``"named"``)."""
    if grouping is None:
        grouping = getattr(report, "grouping", None)
    if grouping is None:
        groups = report.settings.get("groups", "slice")
        grouping = groups if isinstance(groups, str) else "named"
    if grouping not in GROUPING_KINDS:
        raise ValueError(f"grouping must be one of {list(GROUPING_KINDS)}, got {grouping!r}")
    return grouping


# ============================================================================ the grid
@dataclass(frozen=True)
class Grid:
    """Row and column labels, and the cell of every unit (table row) laid out."""

    rows: list[str]
    columns: list[str]
    cells: list[Cell]
    row_title: str
    column_title: str


def slice_grid(source_table: pd.DataFrame, routers: Any, sources: Any) -> Grid:
    """Routers x source labels; the unit ``(routers[i], sources[i])`` in its source's column."""
    names = router_names(source_table)
    order = list(names)
    columns = source_columns(source_table)
    label_of = source_table.set_index(["router", "source"])["label"]
    cells = [(order.index(r), columns.index(label_of[(r, int(s))])) for r, s in zip(routers, sources)]
    return Grid(list(names.values()), columns, cells, "router (layer x sublayer)", "source")


def unit_grid(report: Any, grouping: str) -> Grid:
    """The grid of ``report.table``'s units under ``grouping``: routers x sources (slice),
    routers x families (family), ``sublayer band`` x families (family_band), or groups
    (named)."""
    table, source_table = report.table, report.source_table
    _check_units(table, grouping, report.settings.get("groups"))
    if grouping == "slice":
        return slice_grid(source_table, table["router"], table["source"])
    families = [f for f in FAMILIES if f in set(table.get("family", []))]
    if grouping == "family":
        names = {r: label for r, label in router_names(source_table).items() if r in set(table["router"])}
        order = list(names)
        cells = [(order.index(r), families.index(f)) for r, f in zip(table["router"], table["family"])]
        return Grid(list(names.values()), families, cells, "router (layer x sublayer)", "source family")
    keys = [_group_key(row, table) for _, row in table.iterrows()]
    rows = sorted(dict.fromkeys(keys), key=_band_order(list(report.settings.get("bands", {}) or {})))
    if grouping == "family_band":
        cells = [(rows.index(k), families.index(f)) for k, f in zip(keys, table["family"])]
        return Grid(rows, families, cells, "sublayer x depth band", "source family")
    names = [str(n) for n in table["name"]]
    return Grid(rows, names, [(rows.index(k), i) for i, k in enumerate(keys)], "group", "group")


#: The columns a table's units need, per grouping kind, to be laid out.
UNIT_KEYS = {"slice": ("router", "source"), "family": ("router", "family"), "family_band": ("family",), "named": ("name",)}


def _check_units(table: pd.DataFrame, grouping: str, recorded: Any) -> None:
    """A table whose units lack the keys of ``grouping`` is refused, naming the missing keys."""
    missing = [c for c in UNIT_KEYS[grouping] if c not in table or any(is_missing(v) for v in table[c])]
    if missing:
        raise ValueError(f"the table's units are not grouped by {grouping!r}: they have no {missing} "
                         f"(the report was built with groups={recorded!r}; pass that grouping)")


def _group_key(row: pd.Series, table: pd.DataFrame) -> str:
    parts = [str(row[c]) for c in ("sublayer", "band") if c in table and not is_missing(row[c])]
    return " ".join(parts) if parts else "all"


def _band_order(bands: list[str]) -> Any:
    order = {k: i for i, k in enumerate(SUBLAYERS)}

    def key(group: str) -> tuple:
        head, _, band = group.partition(" ")
        return (order.get(head, 9), bands.index(band) if band in bands else 9, group)

    return key


def merged_copies(report: Any, grid: Grid, grouping: str) -> tuple[MergedCell, ...]:
    """The cells of copies shown under their first holder (slice grids of a report that merged
    its duplicates), where no unit of the grid sits."""
    duplicates = report.settings.get("duplicates") or {}
    source_table = report.source_table
    if grouping != "slice" or not duplicates.get("merged", True) or "duplicate_of" not in source_table:
        return ()
    order = list(router_names(source_table))
    label_of = source_table.set_index(["router", "source"])["label"]
    taken = set(grid.cells)
    out = []
    for _, row in source_table[source_table["duplicate_of"].notna()].iterrows():
        cell = (order.index(row["router"]), grid.columns.index(row["label"]))
        if cell not in taken:
            out.append(MergedCell(cell, row["label"], label_of[(row["router"], int(row["duplicate_of"]))]))
    return tuple(out)


# ============================================================================ hover and marks
def interval_text(row: pd.Series, name: str, fmt: str) -> str:
    """``"0.412 [0.380, 0.450]"``: ``row[name]`` with its ``_low``/``_high`` interval when known."""
    value = row.get(name)
    if is_missing(value):
        return "n/a"
    low, high = row.get(f"{name}_low"), row.get(f"{name}_high")
    if is_missing(low) or is_missing(high):
        return format(float(value), fmt)
    return f"{format(float(value), fmt)} [{format(float(low), fmt)}, {format(float(high), fmt)}]"


def hover_lines(rows: pd.DataFrame, names: dict[str, str]) -> list[tuple[str, ...]]:
    """Per row: its router (or group), source label, family, mass with CI, effect with CI, flag
    and the number of merged copies (1 when the table has no ``n_copies``)."""
    out = []
    for _, row in rows.iterrows():
        router = row.get("router")
        if is_missing(router):
            where = " ".join(str(row[c]) for c in ("sublayer", "band") if c in row and not is_missing(row[c]))
            head = f"{row.get('name', where)}"
        else:
            head = f"{names.get(router, router)} ({router})"
        copies = row.get("n_copies", 1)
        flag = row.get("flag", "")
        out.append((
            head,
            f"source: {row.get('label', 'n/a')}",
            f"family: {row.get('family', 'n/a')}",
            f"mass: {interval_text(row, 'mass', '.3f')}",
            f"effect: {interval_text(row, 'effect', '+.4f')}",
            f"flag: {flag if isinstance(flag, str) and flag else 'none'}",
            f"merged copies: {1 if is_missing(copies) else int(copies)}",
        ))
    return out


def merged_hover(mark: MergedCell, router: str) -> tuple[str, ...]:
    return (router, f"source: {mark.label}", f"the same tensor as {mark.into}: merged, shown under {mark.into}")


def marks(table: pd.DataFrame, cells: list[Cell]) -> tuple[tuple[Cell, ...], tuple[tuple[str, tuple[Cell, ...]], ...]]:
    """The cells whose effect CI includes 0, and the flagged cells per flag (in table order)."""
    uncertain: tuple[Cell, ...] = ()
    if "effect_ci_excludes_zero" in table:
        uncertain = tuple(c for c, ok in zip(cells, table["effect_ci_excludes_zero"]) if not bool(ok))
    flags = list(table["flag"]) if "flag" in table else [""] * len(cells)
    flagged = tuple(
        (flag, tuple(c for c, f in zip(cells, flags) if f == flag))
        for flag in dict.fromkeys(f for f in flags if isinstance(f, str) and f)
    )
    return uncertain, flagged


# ============================================================================ colour scales
def symlog_label(label: str, linthresh: float) -> str:
    """``label`` with the scale said: symlog, and the band around 0 where it is linear."""
    return f"{label}\n(symlog scale, linear within \u00b1{linthresh:.2g})"


def axis_scale(values: Any, scale: str, argument: str = "scale") -> tuple[str, float]:
    """The scale to draw ``values`` on and their largest magnitude (1.0 when all are 0).

    ``scale``: ``"linear"``, ``"symlog"`` or ``"auto"``: symlog when the largest ``|value|`` is
    over 30 times the median non-zero one, so that one catastrophic slice does not wash the
    others out."""
    if scale not in SCALES:
        raise ValueError(f"{argument} must be 'auto', 'linear' or 'symlog', got {scale!r}")
    sizes = np.abs(np.asarray(values, dtype=float)).ravel()
    sizes = sizes[np.isfinite(sizes) & (sizes > 0)]
    largest = float(sizes.max()) if sizes.size else 1.0
    if scale == "auto":
        scale = "symlog" if sizes.size and largest > 30 * float(np.median(sizes)) else "linear"
    return scale, largest


def effect_scale(values: np.ndarray, scale: str, settings: dict) -> ColourScale:
    """A diverging scale centred on 0, symmetric about the largest ``|effect|``."""
    scale, largest = axis_scale(values, scale)
    label = f"effect ({settings.get('metric', 'metric')})"
    if scale == "linear":
        return ColourScale(EFFECT_COLOURS, -largest, largest, label)
    linthresh = max(float(settings.get("effect_threshold", 0.0)), largest * 1e-3)
    return ColourScale(EFFECT_COLOURS, -largest, largest, symlog_label(label, linthresh), linthresh)


# ============================================================================ the heatmaps
def _assemble(quantity: str, title: str, grid: Grid, rows: pd.DataFrame, names: dict[str, str], colour: ColourScale,
              merged: tuple[MergedCell, ...], table_marks: Any) -> Heatmap:
    values = np.full((len(grid.rows), len(grid.columns)), np.nan)
    hover = [[() for _ in grid.columns] for _ in grid.rows]
    notes = [["" for _ in grid.columns] for _ in grid.rows]
    for (r, c), value, lines in zip(grid.cells, rows[quantity].to_numpy(dtype=float), hover_lines(rows, names)):
        values[r, c], hover[r][c] = value, lines
        if math.isfinite(value):
            notes[r][c] = f"{value:.2f}" if quantity == "mass" else f"{value:+.2g}"
    for mark in merged:
        r, c = mark.cell
        hover[r][c] = merged_hover(mark, grid.rows[r])
    uncertain, flagged = table_marks
    return Heatmap(
        quantity, title, tuple(grid.rows), tuple(grid.columns), grid.row_title, grid.column_title, values,
        tuple(tuple(row) for row in hover), tuple(tuple(row) for row in notes), colour, merged, uncertain, flagged,
    )


def effect_heatmap(report: Any, grouping: Optional[str] = None, scale: str = "linear") -> Heatmap:
    """The effect of the intervention on every unit of ``report.table``, on a diverging scale
    (``scale``: ``"linear"``, ``"symlog"`` or ``"auto"``); CI-includes-0 and flagged cells
    marked, merged copies under their first holder."""
    grouping = report_grouping(report, grouping)
    table, settings = report.table, report.settings
    grid = unit_grid(report, grouping)
    colour = effect_scale(table["effect"].to_numpy(dtype=float), scale, settings)
    title = f"Effect of {settings.get('mode', '?')}-ablation on {settings.get('metric', '?')} (ablated - clean)"
    return _assemble("effect", title, grid, table, router_names(report.source_table), colour,
                     merged_copies(report, grid, grouping), marks(table, grid.cells))


def mass_heatmap(report: Any, grouping: Optional[str] = None) -> Heatmap:
    """Routers x sources coloured by routing mass (0 to 1): the routing statistics (mean over
    tokens, ``report.routing.slices``) when present, with the CIs, effects and flags of the
    table's slice rows; else the table's slice rows. A merged duplicate's mass (the sum over
    its copies) sits under its first holder, as in :func:`effect_heatmap`."""
    grouping = report_grouping(report, grouping)
    rows, title = _mass_rows(report, grouping)
    grid = slice_grid(report.source_table, rows["router"], rows["source"])
    merged = merged_copies(report, grid, grouping)
    slice_marks = marks(rows, grid.cells) if grouping == "slice" else ((), ())
    return _assemble("mass", title, grid, rows, router_names(report.source_table),
                     ColourScale(MASS_COLOURS, 0.0, 1.0, "mass"), merged, ((), slice_marks[1]))


def _mass_rows(report: Any, grouping: str) -> tuple[pd.DataFrame, str]:
    """One row per cell of the mass heatmap (router, source, label, family, mass, and the table's
    CI/effect/flag columns for slice reports), and the figure's title."""
    table = report.table
    if report.routing is None:
        if grouping != "slice":
            raise ValueError(
                "this report has neither routing statistics (report.routing is None) nor one row per "
                "slice (groups='slice'), so there is no routers x sources mass to draw"
            )
        return table.reset_index(drop=True), "Routing mass (mean over tokens and prompts)"
    rows = report.routing.slices.copy()
    rows["source"] = rows["source"].astype(int)
    if grouping == "slice":
        rows = _merge_copies(rows, report)
        extra = [c for c in ("label", "mass_low", "mass_high", "effect", "effect_low", "effect_high",
                             "effect_ci_excludes_zero", "flag", "n_copies") if c in table]
        units = table[["router", "source"] + extra].assign(source=table["source"].astype(int))
        rows = rows.drop(columns=[c for c in extra if c in rows]).merge(units, on=["router", "source"], how="left")
        rows["label"] = rows["label"].fillna(rows["source_label"])
    return rows.reset_index(drop=True), "Routing mass (mean over tokens)"


def _merge_copies(rows: pd.DataFrame, report: Any) -> pd.DataFrame:
    """``routing.slices`` with each merged copy's mass added to its first holder's row (the
    copies of one tensor are one unit of the report); ``source_label`` keeps each row's label."""
    rows = rows.rename(columns={"label": "source_label"})
    duplicates = report.settings.get("duplicates") or {}
    source_table = report.source_table
    if not duplicates.get("merged", True) or "duplicate_of" not in source_table:
        return rows
    holder = source_table.set_index(["router", "source"])["duplicate_of"]
    first = [holder.get((r, s), pd.NA) for r, s in zip(rows["router"], rows["source"])]
    rows["holder"] = [s if is_missing(h) else int(h) for s, h in zip(rows["source"], first)]
    mass = rows.groupby(["router", "holder"])["mass"].sum()
    kept = rows[rows["holder"] == rows["source"]].copy()
    kept["mass"] = [float(mass[(r, s)]) for r, s in zip(kept["router"], kept["source"])]
    return kept.drop(columns="holder")


__all__ = [
    "EFFECT_COLOURS",
    "FAMILY_COLOURS",
    "GROUPING_KINDS",
    "MASS_COLOURS",
    "SCALES",
    "ColourScale",
    "Grid",
    "Heatmap",
    "MergedCell",
    "axis_scale",
    "effect_heatmap",
    "effect_scale",
    "hover_lines",
    "is_missing",
    "mass_heatmap",
    "merged_copies",
    "report_grouping",
    "router_label",
    "router_names",
    "slice_grid",
    "source_columns",
    "symlog_label",
    "unit_grid",
]
