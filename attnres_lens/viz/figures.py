"""Interactive plotly figures of a :class:`~attnres_lens.attribution.MassEffectReport`.

plotly is imported inside each function, so ``import attnres_lens`` stays light. The figures
are ``plotly.graph_objects.Figure`` objects: they display inline in Jupyter and VS Code (plotly
ships its JavaScript with the notebook renderer), and :func:`figure_html` writes them with
plotly.js embedded, never fetched from a CDN.
"""

from __future__ import annotations

from typing import Any, Union

import numpy as np

from .layout import FAMILY_COLOURS, ColourScale, Heatmap, effect_heatmap, hover_lines, mass_heatmap, router_names

SUBLAYER_SYMBOLS = {"attn": "circle", "mlp": "square", "final": "triangle-up"}

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


def _symlog(values: Any, linthresh: float) -> Any:
    """Plotly has no symlog colour axis: values are drawn as ``sign * log10(1 + |v| / linthresh)``."""
    values = np.asarray(values, dtype=float)
    return np.sign(values) * np.log10(1.0 + np.abs(values) / linthresh)


def _colour_axis(scale: ColourScale) -> dict:
    """The heatmap trace's colour keywords of ``scale`` (a symlog bar is labelled in real values)."""
    bar = dict(title=scale.label.replace("\n", "<br>"))
    if scale.linthresh is None:
        return dict(colorscale=scale.colours, zmin=scale.low, zmax=scale.high, colorbar=bar)
    ticks = [v for v in (-scale.high, -scale.linthresh, 0.0, scale.linthresh, scale.high)]
    bar.update(tickvals=list(_symlog(ticks, scale.linthresh)), ticktext=[f"{v:+.2g}" for v in ticks])
    lim = float(_symlog(scale.high, scale.linthresh))
    return dict(colorscale=scale.colours, zmin=-lim, zmax=lim, colorbar=bar)


def _cell_marks(go: Any, heat: Heatmap, cells: Any, name: str, **style: Any) -> Any:
    return go.Scatter(x=[heat.columns[c] for _, c in cells], y=[heat.rows[r] for r, _ in cells],
                      mode="markers", name=name, hoverinfo="skip", **style)


def draw_heatmap(heat: Heatmap, title: Union[str, None] = None) -> Any:
    """A plotly figure of the cells of ``heat`` (:mod:`attnres_lens.viz.layout`): hover for every
    number; dots where the effect CI includes 0, boxes on flagged cells, ``= emb`` on a copy
    merged under its first holder."""
    go = require_plotly()
    z = heat.values if heat.colour.linthresh is None else _symlog(heat.values, heat.colour.linthresh)
    text = [["" for _ in heat.columns] for _ in heat.rows]
    for r, c in heat.filled():  # an empty cell shows no hover (a merged copy's is on its mark)
        text[r][c] = "<br>".join((f"<b>{heat.hover[r][c][0]}</b>",) + heat.hover[r][c][1:])
    fig = go.Figure(go.Heatmap(z=z, x=list(heat.columns), y=list(heat.rows), text=text,
                               hovertemplate="%{text}<extra></extra>", hoverongaps=False,
                               **_colour_axis(heat.colour)))
    if heat.uncertain:
        fig.add_trace(_cell_marks(go, heat, heat.uncertain, "CI includes 0",
                                  marker=dict(symbol="circle-open", size=6, color="#666666")))
    for flag, cells in heat.flagged:
        fig.add_trace(_cell_marks(go, heat, cells, flag, marker=dict(symbol="square-open", size=16, line=dict(width=2))))
    if heat.merged:
        fig.add_trace(go.Scatter(
            x=[heat.columns[m.cell[1]] for m in heat.merged], y=[heat.rows[m.cell[0]] for m in heat.merged],
            mode="text", text=[f"= {m.into}" for m in heat.merged], textfont=dict(size=9, color="#555555"),
            name="copy merged under its first holder", hovertemplate="%{hovertext}<extra></extra>",
            hovertext=["<br>".join(heat.hover[r][c]) for r, c in (m.cell for m in heat.merged)],
        ))
    fig.update_layout(
        title=title or heat.title,
        xaxis_title=heat.column_title,
        yaxis_title=heat.row_title,
        yaxis_autorange="reversed",
        height=_heatmap_height(len(heat.rows)),
        plot_bgcolor="#e6e6e6",
        legend=dict(orientation="h", y=-0.15),
    )
    return fig


def plot_routing_heatmap(report: Any, *, title: Union[str, None] = None, grouping: Union[str, None] = None) -> Any:
    """Routers x sources, coloured by routing mass (mean over tokens). Hover: router, source, family,
    mass with CI, effect with CI, flag, merged copies. ``grouping``: the report's grouping kind
    (default: the one it recorded)."""
    return draw_heatmap(mass_heatmap(report, grouping), title)


def plot_effect_heatmap(
    report: Any, *, title: Union[str, None] = None, scale: str = "linear", grouping: Union[str, None] = None
) -> Any:
    """The effect of ablating each row of ``report.table`` (ablated - clean), on a diverging
    scale centred on 0 (``scale``: ``"linear"``, ``"symlog"`` or ``"auto"``). Cells whose CI
    includes 0 are marked with a dot, flagged cells with a box outline; hover shows every number."""
    return draw_heatmap(effect_heatmap(report, grouping, scale), title)


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
    hover = np.array(["<br>".join((f"<b>{lines[0]}</b>",) + lines[1:]) for lines in hover_lines(table, names)],
                     dtype=object)
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
