"""Lay a :class:`~attnres_lens.attribution.MassEffectReport` table out as a heatmap grid.

Pure pandas/numpy (no plotting library): which row and column each table row lands in, and the
hover text every cell shows (router, source label, family, mass with CI, effect with CI, flag,
number of merged copies). The plotly figures (:mod:`attnres_lens.viz.figures`) and the HTML
report draw from these structures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..router import FAMILIES

#: One colour per source family, shared by every interactive figure.
FAMILY_COLOURS = {"embedding": "#1f77b4", "current": "#ff7f0e", "history": "#2ca02c"}
SUBLAYER_SYMBOLS = {"attn": "circle", "mlp": "square", "final": "triangle-up"}


@dataclass(frozen=True)
class Grid:
    """A heatmap layout: ``rows`` x ``columns`` labels, and for every table row its cell."""

    rows: list[str]
    columns: list[str]
    cells: list[tuple[int, int]]
    row_title: str
    column_title: str

    def fill(self, values: Any) -> np.ndarray:
        """A ``[rows, columns]`` array holding ``values`` (one per table row) at their cells,
        NaN where no row lands."""
        grid = np.full((len(self.rows), len(self.columns)), np.nan)
        for (r, c), v in zip(self.cells, np.asarray(values, dtype=float)):
            grid[r, c] = v
        return grid

    def fill_text(self, texts: list[str]) -> list[list[str]]:
        grid = [["" for _ in self.columns] for _ in self.rows]
        for (r, c), text in zip(self.cells, texts):
            grid[r][c] = text
        return grid


def router_label(layer: Any, sublayer: Any) -> str:
    """``"L3 attn"``, or ``"final"`` for the kimi final router."""
    if sublayer == "final" or layer is None or (isinstance(layer, float) and math.isnan(layer)) or layer is pd.NA:
        return "final" if sublayer == "final" else str(sublayer)
    return f"L{int(layer)} {sublayer}"


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


def router_rows(source_table: pd.DataFrame, routers: Any = None) -> tuple[list[str], list[str]]:
    """Router names in forward order (restricted to ``routers`` if given) and their labels."""
    names = list(dict.fromkeys(source_table["router"]))
    if routers is not None:
        wanted = set(routers)
        names = [n for n in names if n in wanted]
    first = source_table.drop_duplicates("router").set_index("router")
    return names, [router_label(first.loc[n, "layer"], first.loc[n, "sublayer"]) for n in names]


def is_slice_level(table: pd.DataFrame) -> bool:
    return bool("router" in table and "source" in table and len(table) > 0 and table["source"].notna().all())


def report_grid(report: Any) -> Grid:
    """The grid of ``report.table``: routers x sources (per slice), routers x families (per
    router and family) or ``sublayer band`` x families (per depth band)."""
    table, source_table = report.table, report.source_table
    if is_slice_level(table):
        routers, labels = router_rows(source_table)
        columns = source_columns(source_table)
        label_of = source_table.set_index(["router", "source"])["label"]
        cells = [
            (routers.index(r), columns.index(label_of[(r, int(s))]))
            for r, s in zip(table["router"], table["source"])
        ]
        return Grid(labels, columns, cells, "router (layer x sublayer)", "source")
    families = [f for f in FAMILIES if "family" in table and f in set(table["family"])]
    if "router" in table and table["router"].notna().all() and "family" in table:
        routers, labels = router_rows(source_table, set(table["router"]))
        cells = [(routers.index(r), families.index(f)) for r, f in zip(table["router"], table["family"])]
        return Grid(labels, families, cells, "router (layer x sublayer)", "source family")
    keys = []
    for _, row in table.iterrows():
        parts = [str(row[c]) for c in ("sublayer", "band") if c in table and not _missing(row[c])]
        keys.append(" ".join(parts) if parts else "all")
    rows = list(dict.fromkeys(keys))
    if families and table["family"].notna().all():
        cells = [(rows.index(k), families.index(f)) for k, f in zip(keys, table["family"])]
        return Grid(rows, families, cells, "sublayer x depth band", "source family")
    names = [str(n) for n in table["name"]]
    return Grid(rows, names, [(rows.index(k), i) for i, k in enumerate(keys)], "group", "group")


def routing_grid(report: Any) -> tuple[Grid, pd.DataFrame]:
    """Routers x sources for the routing mass. Uses ``report.routing.slices`` (every token of
    the routing statistics) when present, else the slice rows of ``report.table``. Returns the
    grid and the rows it lays out, with the report's CI/effect/flag columns merged in where the
    table has the same slice."""
    source_table = report.source_table
    table = report.table
    if report.routing is not None:
        rows = report.routing.slices.copy()
        if is_slice_level(table):
            extra = [c for c in ("mass_low", "mass_high", "effect", "effect_low", "effect_high", "flag", "n_copies")
                     if c in table]
            merged = table[["router", "source"] + extra].copy()
            merged["source"] = merged["source"].astype(int)
            rows["source"] = rows["source"].astype(int)
            rows = rows.merge(merged, on=["router", "source"], how="left")
    elif is_slice_level(table):
        rows = table.copy()
    else:
        raise ValueError(
            "this report has neither routing statistics (report.routing is None) nor one row per "
            "slice (groups='slice'), so there is no routers x sources mass to draw"
        )
    routers, labels = router_rows(source_table)
    columns = source_columns(source_table)
    label_of = source_table.set_index(["router", "source"])["label"]
    cells = [(routers.index(r), columns.index(label_of[(r, int(s))])) for r, s in zip(rows["router"], rows["source"])]
    return Grid(labels, columns, cells, "router (layer x sublayer)", "source"), rows.reset_index(drop=True)


def _missing(value: Any) -> bool:
    try:
        return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))
    except TypeError:
        return False


def _interval(row: pd.Series, name: str, fmt: str) -> str:
    value = row.get(name)
    if _missing(value):
        return "n/a"
    low, high = row.get(f"{name}_low"), row.get(f"{name}_high")
    if _missing(low) or _missing(high):
        return format(float(value), fmt)
    return f"{format(float(value), fmt)} [{format(float(low), fmt)}, {format(float(high), fmt)}]"


def hover_text(rows: pd.DataFrame, router_names: dict[str, str]) -> list[str]:
    """One hover line block per row: router, source label, family, mass with CI, effect with CI,
    flag and the number of merged copies (``n_copies``, 1 when the table has no such column)."""
    texts = []
    for _, row in rows.iterrows():
        router = row.get("router")
        if _missing(router):
            where = " ".join(str(row[c]) for c in ("sublayer", "band") if c in row and not _missing(row[c]))
            head = f"<b>{row.get('name', where)}</b>"
        else:
            head = f"<b>{router_names.get(router, router)}</b> ({router})"
        copies = row.get("n_copies", 1)
        copies = 1 if _missing(copies) else int(copies)
        flag = row.get("flag", "")
        lines = [
            head,
            f"source: {row.get('label', 'n/a')}",
            f"family: {row.get('family', 'n/a')}",
            f"mass: {_interval(row, 'mass', '.3f')}",
            f"effect: {_interval(row, 'effect', '+.4f')}",
            f"flag: {flag if isinstance(flag, str) and flag else 'none'}",
            f"merged copies: {copies}",
        ]
        texts.append("<br>".join(lines))
    return texts


def router_names(source_table: pd.DataFrame) -> dict[str, str]:
    """Router hook prefix -> short label (``"L3 attn"``)."""
    names, labels = router_rows(source_table)
    return dict(zip(names, labels))
