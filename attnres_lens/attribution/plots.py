"""Figures: mass and effect heatmaps, the mass-vs-effect scatter, gradient vs exact, and the
routing of one prompt token by token. matplotlib is imported inside the functions (object API,
no pyplot state), so importing this module costs nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import pandas as pd
import torch

from ..viz.layout import FAMILY_COLOURS, Heatmap, axis_scale, effect_heatmap, mass_heatmap, router_label, symlog_label
from .plot_marks import (
    COUNT_COLOUR,
    fade_markers,
    label_flagged_points,
    mark_coincident_points,
    marker_style,
    settle_layout,
)
from .thresholds import FLAG_CAUSAL_WITHOUT_MASS, FLAG_MASS_WITHOUT_CAUSAL_ROLE

if TYPE_CHECKING:  # annotations only
    from matplotlib.figure import Figure

    from ..model import HookedAttnResTransformer
    from .report import MassEffectReport

SUBLAYER_MARKERS = {"attn": "o", "mlp": "s", "final": "^"}


#: The plotting backends of ``MassEffectReport.plot_*`` and :func:`plot_token_routing`.
BACKENDS = ("matplotlib", "plotly")


def check_backend(backend: Any) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    return backend


def new_figure(width: float, height: float) -> "Figure":
    """A figure that displays itself as a PNG in Jupyter and VS Code (``_repr_png_``), with no
    ``%matplotlib`` magic and no pyplot state (the object API works under any backend)."""
    from .display_figure import DisplayFigure

    return DisplayFigure(figsize=(width, height), layout="constrained")


def save_figure(fig: "Figure", path: Optional[str]) -> "Figure":
    if path is not None:
        fig.savefig(path, dpi=130)
    return fig


def check_plotly_path(path: Any) -> None:
    """A plotly figure is saved as a self-contained ``.html`` page; anything else is an error
    (static images: ``backend="matplotlib"``)."""
    if path is not None and not str(path).lower().endswith((".html", ".htm")):
        raise ValueError(
            f"with backend='plotly', path must end in .html (an interactive page), got {str(path)!r}; "
            "use backend='matplotlib' for PNG, PDF or SVG"
        )


def save_plotly(fig: Any, path: Any) -> Any:
    """Write ``fig`` to ``path`` (``.html``, plotly.js embedded: opens offline) when given."""
    if path is not None:
        fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    return fig



def heatmap(
    report: MassEffectReport, value: str, *, path: Optional[str], annotate: Optional[bool], scale: str = "auto",
    grouping: Optional[str] = None,
) -> "Figure":
    """The report's ``value`` (``"mass"`` or ``"effect"``) heatmap of :mod:`attnres_lens.viz.layout`."""
    heat = mass_heatmap(report, grouping) if value == "mass" else effect_heatmap(report, grouping, scale)
    return save_figure(draw_heatmap(heat, annotate), path)


def draw_heatmap(heat: Heatmap, annotate: Optional[bool] = None) -> "Figure":
    """A matplotlib figure of the cells of ``heat``: values (numbers written when ``annotate``,
    by default when at most 400 cells), CI-includes-0 cells hatched, flagged cells outlined, a
    copy merged under its first holder marked ``= emb``."""
    width = min(24.0, 2.8 + 0.42 * len(heat.columns))
    height = min(30.0, 1.6 + 0.3 * len(heat.rows))
    fig = new_figure(max(width, 5.5), max(height, 3.2))
    ax = fig.add_subplot()
    ax.set_facecolor("#e6e6e6")  # cells no unit fills
    image = ax.imshow(np.ma.masked_invalid(heat.values), cmap=heat.colour.colours, norm=_norm(heat.colour),
                      aspect="auto")
    fig.colorbar(image, ax=ax, label=heat.colour.label, shrink=0.8)
    ax.set_xticks(range(len(heat.columns)), heat.columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(heat.rows)), heat.rows, fontsize=8)
    ax.set_xlabel(heat.column_title)
    ax.set_ylabel(heat.row_title)
    ax.set_title(heat.title, fontsize=10)
    if heat.values.size <= 400 if annotate is None else annotate:
        _annotate_cells(ax, image, heat)
    handles = _hatch_uncertain_cells(ax, heat.uncertain) + _outline_flagged_cells(ax, heat.flagged)
    handles += _mark_merged_cells(ax, heat.merged)
    if handles:
        fig.legend(handles=handles, loc="outside lower center", fontsize=7, ncol=len(handles), frameon=False)
    return fig


def _norm(scale: Any) -> Any:
    from matplotlib.colors import Normalize, SymLogNorm

    if scale.linthresh is None:
        return Normalize(vmin=scale.low, vmax=scale.high)
    return SymLogNorm(linthresh=scale.linthresh, vmin=scale.low, vmax=scale.high, base=10)


def _annotate_cells(ax: Any, image: Any, heat: Heatmap) -> None:
    for row, column in heat.filled():
        rgba = image.cmap(image.norm(heat.values[row, column]))
        luminance = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
        ax.text(column, row, heat.notes[row][column], ha="center", va="center", fontsize=6.5,
                color="black" if luminance > 0.5 else "white")


def _hatch_uncertain_cells(ax: Any, cells: Any) -> list:
    """Hatch the cells whose effect CI includes 0; the legend handle (none when there are none)."""
    from matplotlib.patches import Patch, Rectangle

    for row, column in cells:
        ax.add_patch(Rectangle((column - 0.5, row - 0.5), 1, 1, fill=False, hatch="///", edgecolor="#888888", lw=0))
    return [Patch(facecolor="white", edgecolor="#888888", hatch="///", label="CI includes 0")] if cells else []


#: The outline of a flagged cell, one line style per flag.
FLAG_STYLES = {
    FLAG_MASS_WITHOUT_CAUSAL_ROLE: dict(edgecolor="black", linestyle="-"),
    FLAG_CAUSAL_WITHOUT_MASS: dict(edgecolor="#d62728", linestyle="--"),
}


def _outline_flagged_cells(ax: Any, flagged: Any) -> list:
    """Outline flagged cells, one line style per flag; the legend handles of the flags present."""
    from matplotlib.patches import Patch, Rectangle

    handles = []
    for flag, cells in flagged:
        style = FLAG_STYLES.get(flag, dict(edgecolor="#555555", linestyle=":"))
        for row, column in cells:
            ax.add_patch(Rectangle((column - 0.44, row - 0.44), 0.88, 0.88, fill=False, lw=2.0, **style))
        handles.append(Patch(facecolor="none", lw=2.0, label=flag, **style))
    return handles


def _mark_merged_cells(ax: Any, merged: Any) -> list:
    """Write ``= <first holder>`` in the cell of each copy merged under its first holder."""
    from matplotlib.patches import Patch

    for mark in merged:
        row, column = mark.cell
        ax.text(column, row, f"= {mark.into}", ha="center", va="center", fontsize=6, color="#555555",
                fontstyle="italic")
    return [Patch(facecolor="#e6e6e6", edgecolor="none", label="= x: a copy, merged under x")] if merged else []


def scatter(
    report: MassEffectReport, *, path: Optional[str], annotate_flags: bool, max_labels: int = 8, yscale: str = "auto"
) -> "Figure":
    """Mass against effect with CIs on both, coloured by family, one marker per sublayer kind;
    points drawn on top of one another are counted (``×n``), never moved."""
    t = report.table
    settings = report.settings
    fig = new_figure(7.5, 5.2)
    ax = fig.add_subplot()
    families = t["family"] if "family" in t else pd.Series(["history"] * len(t))
    sublayers = t["sublayer"] if "sublayer" in t else pd.Series(["attn"] * len(t))
    eligible = t["eligible"] if "eligible" in t else pd.Series([True] * len(t))
    for (family, sublayer, is_eligible), part in t.groupby([families, sublayers, eligible], sort=False):
        xerr = np.vstack([part["mass"] - part["mass_low"], part["mass_high"] - part["mass"]]).clip(0)
        yerr = np.vstack([part["effect"] - part["effect_low"], part["effect_high"] - part["effect"]]).clip(0)
        colour = FAMILY_COLOURS.get(family, "#7f7f7f")
        fade_markers(ax.errorbar(
            part["mass"], part["effect"], xerr=xerr, yerr=yerr, fmt=SUBLAYER_MARKERS.get(sublayer, "o"),
            color=colour, ecolor=colour, elinewidth=0.7, capsize=2, markersize=6, linestyle="none",
            **marker_style(colour, filled=bool(is_eligible)),  # hollow: single-source routers
        ))
    effect_threshold = settings["effect_threshold"]
    _draw_thresholds(ax, settings)
    ylabel = f"effect on {settings['metric']} ({settings['mode']}-ablated - clean), bootstrap CI"
    yscale, largest = axis_scale(t["effect"].to_numpy(dtype=float), yscale, "yscale")
    if yscale == "symlog":
        linthresh = max(effect_threshold, largest * 1e-3)
        ax.set_yscale("symlog", linthresh=linthresh)
        top = float(np.nanmax(t["effect_high"]))
        bottom = float(np.nanmin(t["effect_low"]))
        ax.set_ylim(min(bottom * 1.6, -effect_threshold * 1.5), max(top * 1.6, effect_threshold * 1.5))
        ylabel = symlog_label(ylabel, linthresh)
    ax.set_xlim(-0.03, 1.03)
    ax.set_xlabel("routing mass (mean over tokens and prompts), bootstrap CI")
    ax.set_ylabel(ylabel)
    ax.set_title(f"Mass vs effect ({settings['n_prompts']} prompts, {settings['confidence']:.0%} CIs)", fontsize=10)
    settle_layout(ax)  # the texts below are placed in points from their data point: lay out first
    counted = mark_coincident_points(ax, t["mass"], t["effect"])
    if annotate_flags:
        label_flagged_points(ax, t, max_labels, avoid=counted)
    handles = _scatter_legend(set(families), set(sublayers), bool(eligible.all()), settings)
    ax.legend(handles=handles + _count_legend(counted), fontsize=7, loc="best")
    return save_figure(fig, path)


def _draw_thresholds(ax: Any, settings: dict) -> None:
    effect_threshold = settings["effect_threshold"]
    ax.axhline(0.0, color="black", lw=0.8)
    ax.axhspan(-effect_threshold, effect_threshold, color="#bbbbbb", alpha=0.35, lw=0)
    ax.axvline(settings["mass_threshold"], color="black", lw=0.8, ls="--")
    ax.axvline(settings["low_mass_threshold"], color="#d62728", lw=0.8, ls=":")


def _count_legend(counted: list) -> list:
    """The legend entry explaining ``×n``, when some point is counted."""
    from matplotlib.lines import Line2D

    if not counted:
        return []
    return [Line2D([], [], color=COUNT_COLOUR, marker="$\\times n$", markersize=10, ls="none",
                   label="n points at one spot (not moved)")]


def _scatter_legend(families: set, sublayers: set, all_eligible: bool, settings: dict) -> list:
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=colour, marker="o", ls="none", label=family)
        for family, colour in FAMILY_COLOURS.items() if family in families
    ] + [
        Line2D([], [], color="#555555", marker=marker, ls="none", label=sublayer)
        for sublayer, marker in SUBLAYER_MARKERS.items() if sublayer in sublayers
    ]
    if not all_eligible:
        handles.append(Line2D([], [], color="#555555", marker="o", markerfacecolor="none", ls="none",
                              label="single-source router"))
    return handles + [
        Line2D([], [], color="black", ls="--", lw=0.8, label=f"appreciable mass >= {settings['mass_threshold']}"),
        Line2D([], [], color="#d62728", ls=":", lw=0.8, label=f"little mass < {settings['low_mass_threshold']}"),
        Line2D([], [], color="#bbbbbb", lw=6, alpha=0.6, label=f"|effect| < {settings['effect_threshold']}"),
    ]


def gradient_scatter(report: MassEffectReport, *, path: Optional[str], scale: str = "auto") -> "Figure":
    t = report.table
    if not t["grad_estimate"].notna().any():
        raise ValueError("this report has no gradient estimates (gradient=False, or a mode/metric without one)")
    fig = new_figure(6.0, 5.2)
    ax = fig.add_subplot()
    for fam, part in t.groupby(t["family"] if "family" in t else pd.Series(["history"] * len(t)), sort=False):
        yerr = np.vstack([part["effect"] - part["effect_low"], part["effect_high"] - part["effect"]]).clip(0)
        colour = FAMILY_COLOURS.get(fam, "#7f7f7f")
        fade_markers(ax.errorbar(part["grad_estimate"], part["effect"], yerr=yerr, fmt="o", markersize=5, capsize=2,
                                 color=colour, label=fam, linestyle="none", **marker_style(colour, filled=True)))
    low = float(np.nanmin([t["grad_estimate"].min(), t["effect_low"].min()]))
    high = float(np.nanmax([t["grad_estimate"].max(), t["effect_high"].max()]))
    line = np.linspace(low, high, 400)
    ax.plot(line, line, color="black", lw=0.8, ls="--", label="y = x")
    values = np.concatenate([t["grad_estimate"].to_numpy(float), t["effect"].to_numpy(float)])
    scale, lim = axis_scale(values, scale)
    xlabel, ylabel = "first-order (gradient) estimate", "exact effect, bootstrap CI"
    if scale == "symlog":
        linthresh = lim * 1e-3
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.set_yscale("symlog", linthresh=linthresh)
        xlabel, ylabel = symlog_label(xlabel, linthresh), symlog_label(ylabel, linthresh)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    g = report.gradient_agreement or {}
    ax.set_title(
        f"Gradient ({g.get('estimate')}) vs exact: Spearman {g.get('spearman', float('nan')):+.2f}", fontsize=10
    )
    settle_layout(ax)
    counted = mark_coincident_points(ax, t["grad_estimate"], t["effect"])
    ax.legend(handles=ax.get_legend_handles_labels()[0] + _count_legend(counted), fontsize=7)
    return save_figure(fig, path)


#: Token labels of :func:`plot_token_routing` are never smaller than this (points).
MIN_TOKEN_FONTSIZE = 7.0
#: Inches between two labelled tokens (a rotated 7-point label is about 0.1 inch thick).
TOKEN_LABEL_SPACING = 0.16
#: Inches of a token-routing figure's width that are not the token axis (source labels, colour bar).
TOKEN_FIGURE_MARGIN = 3.4


def plot_token_routing(
    model: "HookedAttnResTransformer",
    text_or_tokens: Any,
    router: Any = None,
    *,
    path: Optional[str] = None,
    max_tokens: int = 64,
    backend: str = "matplotlib",
) -> Any:
    """Routing weights of one prompt, token by token: for each chosen router, a sources x
    positions heatmap of mass (labels from ``source_table()``, tokens on the x axis).

    ``router``: a router name (``"blocks.3.mlp_router"``, ``"final_router"``), a
    ``(layer, "attn"|"mlp")`` pair, ``"final"``, a list of those, ``"all"``, or ``None`` (the
    final router in kimi models, the last MLP router in cumulative ones). Only the first
    ``max_tokens`` positions are drawn. Token labels show blanks and control characters
    (``\\n``, ``\u2423``); when too many to fit, one in ``k`` is labelled, as the axis title says.

    ``backend``: ``"matplotlib"`` (a figure that displays inline as a PNG; ``path`` any format
    matplotlib writes) or ``"plotly"`` (:func:`attnres_lens.viz.plot_token_routing`: one router,
    hover for every cell; ``path`` an ``.html`` page)."""
    if check_backend(backend) == "plotly":
        check_plotly_path(path)
        if isinstance(router, list) or router == "all":
            raise ValueError(f"backend='plotly' draws one router; got router={router!r}")
        from ..viz import plot_token_routing as plotly_token_routing

        return save_plotly(plotly_token_routing(model, text_or_tokens, router, max_tokens=max_tokens), path)
    from ..viz.tokens import one_prompt, tick_step, tick_token, token_axis_title  # imports no plotly

    tokens = one_prompt(model, text_or_tokens)
    specs = {s.name: s for s in model.router_specs}
    names = routers_to_plot(model, router)
    hooks = [f"{n}.hook_weights" for n in names]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hooks, return_type=None)
    n_pos = min(int(tokens.shape[1]), max_tokens)
    strs = [tick_token(s) for s in model.to_str_tokens(tokens[0, :n_pos])]
    heights = [max(1.0, 0.28 * specs[n].n_sources + 0.9) for n in names]
    width = min(22.0, TOKEN_FIGURE_MARGIN + 0.28 * n_pos)
    step = tick_step(n_pos, width - TOKEN_FIGURE_MARGIN, TOKEN_LABEL_SPACING)
    fig = new_figure(width, min(40.0, sum(heights) + 0.6))
    axes = fig.subplots(len(names), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, name in zip(axes, names):
        w = cache[f"{name}.hook_weights"][0, :n_pos].float().cpu().numpy().T  # [source, pos]
        im = ax.imshow(w, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        spec = specs[name]
        ax.set_yticks(range(spec.n_sources), [f"{s.label} \u00b7 {s.family}" for s in spec.sources],
                      fontsize=MIN_TOKEN_FONTSIZE)
        labelled = range(0, n_pos, step)
        ax.set_xticks(labelled, [strs[i] for i in labelled], fontsize=MIN_TOKEN_FONTSIZE, rotation=90)
        ax.set_xticks(range(n_pos), minor=True)
        ref = w[:, :1]
        spread = float(np.sqrt(((w - w.mean(1, keepdims=True)) ** 2).mean(1).sum())) if not np.all(w == ref) else 0.0
        ax.set_title(f"{router_label(spec.layer, spec.sublayer)} ({name}): token std of mass = {spread:.3f}",
                     fontsize=9, loc="left")
        fig.colorbar(im, ax=ax, label="mass", pad=0.01, fraction=0.03)
    axes[-1].set_xlabel(token_axis_title(n_pos, int(tokens.shape[1]), step))
    return save_figure(fig, path)


def routers_to_plot(model: "HookedAttnResTransformer", router: Any) -> list[str]:
    """The routers ``router`` names: ``"all"``, a list, or one router as
    :func:`attnres_lens.viz.tokens.resolve_router` reads it (the one viz resolver)."""
    from ..viz.tokens import resolve_router  # imports no plotly

    if isinstance(router, str) and router == "all":
        return [s.name for s in model.router_specs]
    try:
        return [resolve_router(model, item) for item in (router if isinstance(router, list) else [router])]
    except ValueError as err:
        raise ValueError(f"{err} (or 'all', or a list of those)") from None


__all__ = [
    "BACKENDS",
    "axis_scale",
    "check_backend",
    "draw_heatmap",
    "check_plotly_path",
    "gradient_scatter",
    "heatmap",
    "new_figure",
    "plot_token_routing",
    "save_figure",
    "save_plotly",
    "scatter",
]
