"""Text for tables: row names, router labels, missing values, markdown (no ``tabulate``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd


def is_missing(value: Any) -> bool:
    """``None``, ``pd.NA`` or a float NaN: a cell a row does not have."""
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def router_label(layer: Any, sublayer: Any) -> str:
    """``"L3 mlp"``, or ``"final"`` for the final router."""
    if sublayer == "final" or is_missing(layer):
        return "final" if sublayer == "final" else str(sublayer)
    return f"L{int(layer)} {sublayer}"


def row_name(row: Any) -> str:
    """A short human name for a table row: ``"L3 mlp: [1] block 0"`` (slice), ``"L3 mlp:
    history"`` (family at a router), else the group's label."""
    router, source, label = row.get("router"), row.get("source"), row.get("label")
    if not is_missing(router):
        head = router_label(row.get("layer"), row.get("sublayer"))
        if not is_missing(source):
            return f"{head}: [{int(source)}] {label}"
        if not is_missing(row.get("family")):
            return f"{head}: {row['family']}"
    return str(label)


def markdown_table(df: pd.DataFrame, floatfmt: str = ".4f") -> str:
    """A GitHub-markdown table (no dependency on ``tabulate``)."""

    def cell(v: Any) -> str:
        if is_missing(v):
            return ""
        if isinstance(v, (float, np.floating)):
            return format(float(v), floatfmt)
        return str(v).replace("|", "\\|")

    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)



__all__ = ["is_missing", "markdown_table", "router_label", "row_name"]
