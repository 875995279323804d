"""Interactive plotly figures of a :class:`~attnres_lens.attribution.MassEffectReport`.

plotly is imported inside each function, so ``import attnres_lens`` stays light. The figures
are ``plotly.graph_objects.Figure`` objects: they display inline in Jupyter and VS Code (plotly
ships its JavaScript with the notebook renderer), and :func:`figure_html` writes them with
plotly.js embedded, never fetched from a CDN.
"""

from __future__ import annotations

from typing import Any, Union

import numpy as np

from .grid import FAMILY_COLOURS, SUBLAYER_SYMBOLS, hover_text, report_grid, router_names, routing_grid

PLOTLY_HINT = "the interactive figures need plotly: pip install plotly (or pip install 'attnres_lens[viz]')"


def require_plotly() -> Any:
    """``plotly.graph_objects``, or an ImportError naming the install command."""
    try:
        import plotly.graph_objects as go
    except ImportError as err:  # pragma: no cover - plotly is a declared extra
        raise ImportError(PLOTLY_HINT) from err
    return go


def _heatmap_height(n_rows: int) -> int:
    """Room for every row (>= 22 px) and, however few rows, for a readable colour bar: a few-row
    grid (family x band: 5 rows) drawn 270 px high squashed its colour-bar labels together."""
    return int(min(1400, max(460, 200 + 26 * n_rows)))


def plot_routing_heatmap(report: Any, *, title: Union[str, None] = None) -> Any:
    """Routers x sources, coloured by routing mass (mean over tokens). Hover: router, source, family,
    mass with CI, effect with CI, flag, merged copies."""
    go = require_plotly()
    grid, rows = routing_grid(report)
    names = router_names(report.source_table)
    fig = go.Figure(
        go.Heatmap(
            z=grid.fill(rows["mass"]),
            x=grid.columns,
            y=grid.rows,
            text=grid.fill_text(hover_text(rows, names)),
            hovertemplate="%{text}<extra></extra>",
            colorscale="Viridis",
            zmin=0.0,
            zmax=1.0,
            colorbar=dict(title="mass"),
            hoverongaps=False,
        )
    )
    fig.update_layout(
        title=title or "Routing mass (mean over tokens)",
        xaxis_title=grid.column_title,
        yaxis_title=grid.row_title,
        yaxis_autorange="reversed",
        height=_heatmap_height(len(grid.rows)),
        plot_bgcolor="#e6e6e6",
    )
    return fig


def plot_effect_heatmap(report: Any, *, title: Union[str, None] = None) -> Any:
    """The effect of ablating each row of ``report.table`` (ablated - clean), on a diverging
    scale centred on 0. Cells whose CI includes 0 are marked with a dot, flagged cells with a
    box outline; hover shows every number."""
    go = require_plotly()
    table = report.table
    grid = report_grid(report)
    names = router_names(report.source_table)
    z = grid.fill(table["effect"])
    finite = np.abs(z[np.isfinite(z)])
    lim = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=grid.columns,
            y=grid.rows,
            text=grid.fill_text(hover_text(table, names)),
            hovertemplate="%{text}<extra></extra>",
            colorscale="RdBu_r",
            zmin=-lim,
            zmax=lim,
            colorbar=dict(title="effect"),
            hoverongaps=False,
        )
    )
    if "effect_ci_excludes_zero" in table:
        unsure = [cell for cell, ok in zip(grid.cells, table["effect_ci_excludes_zero"]) if not bool(ok)]
        if unsure:
            fig.add_trace(
                go.Scatter(
                    x=[grid.columns[c] for _, c in unsure],
                    y=[grid.rows[r] for r, _ in unsure],
                    mode="markers",
                    marker=dict(symbol="circle-open", size=6, color="#666666"),
                    name="CI includes 0",
                    hoverinfo="skip",
                )
            )
    flagged = [(cell, flag) for cell, flag in zip(grid.cells, table.get("flag", [""] * len(table))) if flag]
    for flag in dict.fromkeys(f for _, f in flagged):
        cells = [cell for cell, f in flagged if f == flag]
        fig.add_trace(
            go.Scatter(
                x=[grid.columns[c] for _, c in cells],
                y=[grid.rows[r] for r, _ in cells],
                mode="markers",
                marker=dict(symbol="square-open", size=16, line=dict(width=2)),
                name=flag,
                hoverinfo="skip",
            )
        )
    s = report.settings
    fig.update_layout(
        title=title or f"Effect of {s.get('mode', '?')}-ablation on {s.get('metric', '?')} (ablated - clean)",
        xaxis_title=grid.column_title,
        yaxis_title=grid.row_title,
        yaxis_autorange="reversed",
        height=_heatmap_height(len(grid.rows)),
        plot_bgcolor="#e6e6e6",
        legend=dict(orientation="h", y=-0.15),
    )
    return fig


def _error_bars(part: Any, column: str, colour: str) -> dict:
    """Plotly's asymmetric error bars from a table's ``column`` and its ``_low``/``_high`` interval."""
    return dict(
        type="data",
        symmetric=False,
        array=(part[f"{column}_high"] - part[column]).clip(lower=0),
        arrayminus=(part[column] - part[f"{column}_low"]).clip(lower=0),
        thickness=0.8,
        color=colour,
    )


def plot_mass_effect_scatter(report: Any, *, title: Union[str, None] = None) -> Any:
    """Mass (x) against effect (y), one point per table row with both bootstrap CIs as error
    bars; colour = family, symbol = sublayer, hollow = single-source router (not eligible)."""
    go = require_plotly()
    table = report.table
    s = report.settings
    names = router_names(report.source_table)
    hover = np.array(hover_text(table, names), dtype=object)
    fig = go.Figure()
    families = table["family"] if "family" in table else ["history"] * len(table)
    sublayers = table["sublayer"] if "sublayer" in table else ["attn"] * len(table)
    eligible = table["eligible"] if "eligible" in table else [True] * len(table)
    keys = list(zip(families, sublayers, eligible))
    for key in dict.fromkeys(keys):
        family, sublayer, ok = key
        idx = [i for i, k in enumerate(keys) if k == key]
        part = table.iloc[idx]
        colour = FAMILY_COLOURS.get(family, "#7f7f7f")
        fig.add_trace(
            go.Scatter(
                x=part["mass"],
                y=part["effect"],
                mode="markers",
                name=f"{family}, {sublayer}" + ("" if ok else " (single source)"),
                text=hover[idx],
                hovertemplate="%{text}<extra></extra>",
                marker=dict(
                    color=colour if ok else "rgba(0,0,0,0)",
                    line=dict(color=colour, width=1.5),
                    symbol=SUBLAYER_SYMBOLS.get(sublayer, "circle"),
                    size=9,
                ),
                error_x=_error_bars(part, "mass", colour),
                error_y=_error_bars(part, "effect", colour),
            )
        )
    threshold = float(s.get("effect_threshold", 0.0))
    if threshold > 0:
        fig.add_hrect(y0=-threshold, y1=threshold, fillcolor="#bbbbbb", opacity=0.35, line_width=0)
    fig.add_hline(y=0.0, line_width=0.8, line_color="black")
    if "mass_threshold" in s:
        fig.add_vline(x=s["mass_threshold"], line_dash="dash", line_width=0.8)
    if "low_mass_threshold" in s:
        fig.add_vline(x=s["low_mass_threshold"], line_dash="dot", line_width=0.8, line_color="#d62728")
    fig.update_layout(
        title=title or f"Mass vs effect ({s.get('n_prompts', '?')} prompts, bootstrap CIs)",
        xaxis_title="routing mass (mean over tokens)",
        yaxis_title=f"effect on {s.get('metric', 'metric')} ({s.get('mode', '?')}-ablated - clean)",
        xaxis_range=[-0.03, 1.03],
        height=560,
    )
    return fig


def figure_html(fig: Any, *, include_plotlyjs: Union[bool, str] = True, div_id: Union[str, None] = None) -> str:
    """An HTML fragment of ``fig``. ``include_plotlyjs=True`` embeds plotly.js (offline);
    ``False`` assumes the page already holds it (one copy per page). A CDN is never used."""
    if include_plotlyjs not in (True, False, "inline"):
        raise ValueError(
            f"include_plotlyjs must be True/'inline' (embed plotly.js) or False (the page has it), "
            f"got {include_plotlyjs!r}; a CDN is never used so the HTML opens offline"
        )
    return fig.to_html(
        full_html=False,
        include_plotlyjs=bool(include_plotlyjs),
        div_id=div_id,
        config={"displaylogo": False, "responsive": True},
    )
