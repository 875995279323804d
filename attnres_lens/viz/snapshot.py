"""An explorer's current view as one self-contained HTML page (for sharing and browser tests).

No widget manager is needed to open it: the token views are plain HTML with tooltips and the
figures are plotly, with plotly.js embedded once in the page (never a CDN).
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np

from .figures import figure_html, require_plotly
from .render import choices_html, loss_tokens_html, predictions_html, routing_tokens_html
from .session import ExplorerSession
from .tokens import TokenRouting, token_routing_figure

PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.4em; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 2px 6px; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
"""


def loss_figure(session: ExplorerSession, loss_clean: np.ndarray, loss_intervened: np.ndarray) -> Any:
    """Next-token loss per position, clean and intervened (plotly)."""
    go = require_plotly()
    positions = list(range(1, len(session.str_tokens)))
    labels = [repr(t) for t in session.str_tokens[1:]]
    fig = go.Figure()
    for name, values in (("clean", loss_clean), ("intervened", loss_intervened)):
        fig.add_trace(go.Scatter(x=positions, y=values, mode="lines+markers", name=name, text=labels,
                                 hovertemplate="position %{x} %{text}<br>loss %{y:.3f}<extra>" + name + "</extra>"))
    fig.update_layout(title="Next-token loss per position", xaxis_title="position (token predicted)",
                      yaxis_title="loss (nats)", height=340)
    return fig


def snapshot_page(session: ExplorerSession, router: str, colour_source: int, *, title: str) -> str:
    """The HTML page of the session's current state, showing ``router``."""
    result = session.result()
    spec = session.specs[router]
    labels = [s.label for s in spec.sources]
    routing = TokenRouting(
        router=router,
        router_label=session.router_label(router),
        tokens=session.str_tokens,
        source_labels=labels,
        families=[s.family for s in spec.sources],
        mass=result.routing[router],
    )
    heatmap = token_routing_figure(routing, title=f"Routing per token at {routing.router_label} (as run)")
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(session.str_tokens)} tokens; router <b>{html.escape(routing.router_label)}</b> ({router}).</p>",
        "<h2>Interventions</h2>",
        choices_html(session.choices, session.router_label),
        "<h2>Routing per token</h2>",
        routing_tokens_html(session.str_tokens, routing.mass, labels, colour_source),
        figure_html(heatmap, include_plotlyjs=True, div_id="routing-heatmap"),
        "<h2>Predictions and metric</h2>",
        predictions_html(result, session.str_tokens),
        "<h2>Loss per token</h2>",
        loss_tokens_html(session.str_tokens, result.loss_clean, result.loss_intervened),
        figure_html(loss_figure(session, result.loss_clean, result.loss_intervened), include_plotlyjs=False,
                    div_id="loss-per-token"),
        "<h2>Code</h2>",
        f"<pre><code>{html.escape(session.code())}</code></pre>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{PAGE_STYLE}</style></head>"
        f'<body>{"".join(parts)}</body></html>\n'
    )
