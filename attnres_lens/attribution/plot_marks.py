"""What the scatters write on top of their points: axis labels that say the scale, names of
flagged points kept inside the axes, and counts of points drawn on top of one another.

Points are never jittered: coincident points keep their true position, drawn translucent with
an edge, and a cluster of them is labelled with its size (``×3``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.text import Text

from ..viz.layout import symlog_label
from .thresholds import FLAG_CAUSAL_WITHOUT_MASS, FLAG_MASS_WITHOUT_CAUSAL_ROLE

#: Marker alpha of the scatters: a point under another still shows through.
POINT_ALPHA = 0.7
#: Points closer than this (a fraction of the axes, on both axes) are one cluster, counted ``×n``.
COINCIDENT_WITHIN = 0.012
#: Text of a ``×n`` count.
COUNT_COLOUR = "#444444"


def marker_style(colour: str, filled: bool) -> dict[str, Any]:
    """Marker keywords of ``Axes.errorbar``: translucent faces with an opaque edge, so that
    overlapping points stay several (a white edge on filled markers, the colour on hollow ones)."""
    return dict(
        markerfacecolor=colour if filled else "none",
        markeredgecolor="white" if filled else colour,
        markeredgewidth=0.7 if filled else 1.2,
    )


def fade_markers(container: Any) -> None:
    """Make the markers of an ``errorbar`` container translucent (its error bars stay opaque)."""
    container.lines[0].set_alpha(POINT_ALPHA)


def settle_layout(ax: Any) -> None:
    """Run the figure's layout now, so that texts placed in points from a data point (which
    :func:`label_flagged_points` measures) sit where they will be drawn. Call it once the axes'
    labels, scales and limits are set; the texts placed after are kept out of the layout."""
    engine = ax.figure.get_layout_engine()
    if engine is not None:
        engine.execute(ax.figure)


def axes_fraction(ax: Any, x: float, y: float) -> tuple[float, float]:
    """Where data point ``(x, y)`` lies in the axes (0..1 on both), under the current limits and
    scales."""
    ax.get_xlim(), ax.get_ylim()  # settle autoscaled limits first
    fx, fy = ax.transAxes.inverted().transform(ax.transData.transform((x, y)))
    return float(fx), float(fy)


def inside_offset(fx: float, fy: float, dx: float, dy: float, *, room_x: float = 0.5) -> dict[str, Any]:
    """``annotate`` keywords that put text ``(dx, dy)`` points from a point at axes fraction
    ``(fx, fy)``, flipped to the other side when the preferred side has too little room (less
    than ``room_x`` of the axes across, a quarter of it up or down)."""
    if (dx >= 0 and fx > 1 - room_x) or (dx < 0 and fx < room_x):
        dx = -dx
    if (dy >= 0 and fy > 0.75) or (dy < 0 and fy < 0.25):
        dy = -dy
    return dict(
        xytext=(dx, dy),
        textcoords="offset points",
        ha="left" if dx >= 0 else "right",
        va="bottom" if dy >= 0 else "top",
        annotation_clip=True,  # a point outside the axes gets no label
    )


#: How many 10-point steps a flagged point's label may move away from its point to clear others.
MAX_LABEL_STEPS = 6


def text_extent(annotation: Any) -> Any:
    """The display box of an annotation's text (not its leader line), at its drawn position."""
    annotation.get_window_extent()  # places the text relative to its point first
    return Text.get_window_extent(annotation)


def label_flagged_points(ax: Any, table: pd.DataFrame, max_labels: int, avoid: Sequence[Any] = ()) -> list[Any]:
    """Name the most telling flagged rows: the largest effects without mass, then the largest
    masses without a role. Labels point away from the nearest edges, so they stay inside the
    axes, and step away from their point (with a leader line) until they clear the labels
    before them and the texts in ``avoid``; a label that finds no clear spot is left out (the
    table names every row). The labels written."""
    flagged = table[table["flag"] != ""]
    no_role = flagged[flagged["flag"] == FLAG_MASS_WITHOUT_CAUSAL_ROLE].nlargest(max_labels, "mass")
    causal = flagged[flagged["flag"] == FLAG_CAUSAL_WITHOUT_MASS].nlargest(max_labels, "abs_effect")
    placed = [text_extent(text) for text in avoid]
    labels = []
    for _, row in pd.concat([causal, no_role]).head(max_labels).iterrows():
        fx, fy = axes_fraction(ax, row["mass"], row["effect"])
        colour = "black" if row["flag"] == FLAG_MASS_WITHOUT_CAUSAL_ROLE else "#d62728"
        for step in range(MAX_LABEL_STEPS + 1):
            leader = dict(arrowprops=dict(arrowstyle="-", lw=0.4, color=colour, shrinkA=0, shrinkB=3)) if step else {}
            label = ax.annotate(row["name"], (row["mass"], row["effect"]), fontsize=7, color=colour,
                                **inside_offset(fx, fy, 6.0, 6.0 + 10 * step), **leader)
            label.set_in_layout(False)
            extent = text_extent(label)
            if not any(extent.overlaps(other) for other in placed):
                placed.append(extent)
                labels.append(label)
                break
            label.remove()  # no room within MAX_LABEL_STEPS: the row goes unnamed (the table has it)
    return labels


def coincident_clusters(fractions: np.ndarray, within: float = COINCIDENT_WITHIN) -> list[list[int]]:
    """Indices of the points (rows of ``fractions``, axes fractions) closer than ``within`` on
    both axes to a cluster's first point, clusters of two or more only, in input order."""
    clusters: list[list[int]] = []
    for i, point in enumerate(fractions):
        if not np.all(np.isfinite(point)):
            continue
        for cluster in clusters:
            if np.all(np.abs(fractions[cluster[0]] - point) < within):
                cluster.append(i)
                break
        else:
            clusters.append([i])
    return [cluster for cluster in clusters if len(cluster) > 1]


def mark_coincident_points(ax: Any, xs: Any, ys: Any) -> list[Any]:
    """Write ``×n`` beside each cluster of ``n`` points drawn on top of one another (``xs``,
    ``ys``: array-likes; positions as drawn: the data is not moved); the texts written."""
    xs = np.asarray(xs, dtype=float)
    ys = np.asarray(ys, dtype=float)
    fractions = np.array([axes_fraction(ax, x, y) for x, y in zip(xs, ys)]).reshape(-1, 2)
    texts = []
    for cluster in coincident_clusters(fractions):
        fx, fy = fractions[cluster[0]]
        texts.append(ax.annotate(
            f"\u00d7{len(cluster)}", (xs[cluster[0]], ys[cluster[0]]), fontsize=7, color=COUNT_COLOUR,
            fontweight="bold", in_layout=False, **inside_offset(float(fx), float(fy), -5.0, -5.0, room_x=0.1),
        ))
    return texts


__all__ = [
    "COINCIDENT_WITHIN",
    "COUNT_COLOUR",
    "MAX_LABEL_STEPS",
    "POINT_ALPHA",
    "axes_fraction",
    "coincident_clusters",
    "fade_markers",
    "inside_offset",
    "label_flagged_points",
    "mark_coincident_points",
    "marker_style",
    "settle_layout",
    "symlog_label",
    "text_extent",
]
