"""The circuit graph as a plotly figure: depth runs left to right, routing edges coloured by
their score, hover with mass and effect, a circuit's edges drawn solid and the rest dotted.

Layout (pure, :func:`node_positions`): a sublayer ``k`` at ``x = k``, its router just before it
(``k - 0.35``), a source just after its last member (``max(members) + 0.35``), the embedding at
``-1`` and the logits after the last step; sources stack upwards, routers and sublayers sit on
the bottom row.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .circuit import Circuit
from .effects import EdgeEffects
from .graph import DepthGraph, Edge, Node

#: Where each node kind sits relative to its step (x offset) and which row it starts on.
X_OFFSET = {"embedding": 0.0, "attn": 0.0, "mlp": 0.0, "head": 0.0, "router": -0.35, "logits": 0.0}
SOURCE_ROW_HEIGHT = 1.0
COLOURSCALE = "RdBu_r"  # effect > 0 (the metric rises when the edge is ablated) is red


def node_positions(graph: DepthGraph) -> dict[str, tuple[float, float]]:
    """``{node id: (x, y)}`` (see the module docstring); heads of one layer spread vertically."""
    positions: dict[str, tuple[float, float]] = {}
    stacked: dict[float, int] = {}
    for node in graph.nodes:
        if node.kind == "source":
            x = max(node.members) + 0.35 if node.members[-1] >= 0 else -0.65
            stacked[x] = stacked.get(x, 0) + 1
            positions[node.id] = (x, SOURCE_ROW_HEIGHT * stacked[x])
        elif node.kind == "head":
            positions[node.id] = (float(node.step), -0.25 * node.head)
        else:
            positions[node.id] = (float(node.step) + X_OFFSET[node.kind], 0.0)
    return positions


def circuit_figure(
    graph: DepthGraph,
    scores: Optional[EdgeEffects] = None,
    circuit: Optional[Circuit] = None,
    *,
    title: str = "",
    path: Any = None,
) -> Any:
    """The depth graph with its routing edges coloured by ``scores`` (mean effect per edge) and
    ``circuit``'s edges solid (the others dotted); written as a self-contained HTML page to
    ``path`` (``.html``) when given. Hovering a routing edge's midpoint shows its id, mass,
    effect and whether it is in the circuit."""
    import plotly.graph_objects as go
    from plotly.colors import sample_colorscale

    from ..attribution.plots import check_plotly_path, save_plotly

    check_plotly_path(path)
    if circuit is not None:
        circuit.check(graph)
    if scores is not None and list(scores.keys) != [e.id for e in graph.routing_edges]:
        raise ValueError("scores must have one row per routing edge of the graph, in its order "
                         "(score_edges(..., graph=graph))")
    xy = node_positions(graph)
    edges = graph.routing_edges
    effect = scores.score if scores is not None else np.zeros(len(edges))
    mass = scores.mass.mean(axis=1) if scores is not None else np.full(len(edges), np.nan)
    bound = float(np.abs(effect).max()) or 1.0
    colours = sample_colorscale(COLOURSCALE, list((effect / bound + 1) / 2))
    fig = go.Figure()
    fig.add_trace(_structure_trace(graph, xy))
    for edge, colour, e in zip(edges, colours, effect):
        kept = circuit is None or edge.id in circuit
        (x0, y0), (x1, y1) = xy[edge.src], xy[edge.dst]
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="skip", showlegend=False,
                                 name=edge.id, line=dict(color=colour, width=1.5 + 4.5 * abs(e) / bound,
                                                         dash="solid" if kept else "dot")))
    fig.add_trace(_edge_hover_trace(edges, xy, effect, mass, circuit, bound))
    fig.add_trace(_node_trace(graph, xy))
    fig.update_layout(title=title or _default_title(scores, circuit), plot_bgcolor="white", height=520, showlegend=False,
                      xaxis=dict(visible=False), yaxis=dict(visible=False), hovermode="closest",
                      margin=dict(l=20, r=20, t=60, b=20))
    return save_plotly(fig, path)


def _default_title(scores: Optional[EdgeEffects], circuit: Optional[Circuit]) -> str:
    parts = ["depth graph"]
    if scores is not None:
        parts.append(f"edges coloured by {scores.method} effect ({scores.ablation} ablation)")
    if circuit is not None:
        parts.append(f"circuit: {len(circuit)} edges solid")
    return ", ".join(parts)


def _edge_hover_trace(edges: list[Edge], xy: dict, effect: np.ndarray, mass: np.ndarray,
                      circuit: Optional[Circuit], bound: float) -> Any:
    import plotly.graph_objects as go

    mid = np.array([[(xy[e.src][0] + xy[e.dst][0]) / 2, (xy[e.src][1] + xy[e.dst][1]) / 2] for e in edges])
    text = [f"{e.id}<br>mass: {m:.3f}<br>effect: {v:+.4f}"
            + ("" if circuit is None else f"<br>in circuit: {'yes' if e.id in circuit else 'no'}")
            for e, m, v in zip(edges, mass, effect)]
    return go.Scatter(x=mid[:, 0], y=mid[:, 1], mode="markers", name="routing edges", text=text,
                      hovertemplate="%{text}<extra></extra>", customdata=[e.id for e in edges],
                      marker=dict(size=9, color=effect, colorscale=COLOURSCALE, cmin=-bound, cmax=bound,
                                  colorbar=dict(title="effect"), line=dict(width=0.5, color="#444")))


def _structure_trace(graph: DepthGraph, xy: dict) -> Any:
    """The writes / reads / readout edges, thin and grey, as one trace."""
    import plotly.graph_objects as go

    xs: list[Optional[float]] = []
    ys: list[Optional[float]] = []
    for edge in graph.edges:
        if edge.kind != "routes":
            xs += [xy[edge.src][0], xy[edge.dst][0], None]
            ys += [xy[edge.src][1], xy[edge.dst][1], None]
    return go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", name="writes / reads",
                      line=dict(color="#cccccc", width=0.8))


def _node_trace(graph: DepthGraph, xy: dict) -> Any:
    import plotly.graph_objects as go

    symbols = {"embedding": "diamond", "attn": "square", "mlp": "square", "head": "square",
               "source": "circle", "router": "triangle-right", "logits": "star"}
    nodes: list[Node] = list(graph.nodes)
    return go.Scatter(
        x=[xy[n.id][0] for n in nodes], y=[xy[n.id][1] for n in nodes], mode="markers+text", name="nodes",
        text=[n.label if n.kind not in ("source", "router") else "" for n in nodes], textposition="bottom center",
        hovertext=[f"{n.label} ({n.kind})" + (f"<br>members: {list(n.members)}" if n.members else "") for n in nodes],
        hoverinfo="text", marker=dict(size=12, symbol=[symbols[n.kind] for n in nodes], color="#555555"))


__all__ = ["circuit_figure", "node_positions"]
