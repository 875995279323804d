"""HTML fragments of an explorer's state (plain strings, no widget library).

The widget (:mod:`attnres_lens.viz.explorer`) shows them in ``ipywidgets.HTML`` and the offline
snapshot writes them into a page, so both show the same thing. Every token is a ``<span>``
whose ``title`` (the browser's tooltip) lists its numbers: hover a token to read them.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import numpy as np

from .session import ExplorerResult, SliceChoice

TOKEN_STYLE = (
    "display:inline-block;margin:1px;padding:0 2px;border-radius:3px;"
    "font-family:monospace;font-size:12px;white-space:pre;"
)


def _span(text: str, background: str, title: str, extra: str = "") -> str:
    return (
        f'<span class="ar-token" style="{TOKEN_STYLE}background:{background};{extra}" '
        f'title="{html.escape(title, quote=True)}">{html.escape(text)}</span>'
    )


def routing_tokens_html(
    tokens: Sequence[str], mass: np.ndarray, source_labels: Sequence[str], colour_source: int
) -> str:
    """The prompt's tokens, each shaded by its weight on source ``colour_source``; hovering a
    token shows its weights over every source."""
    if not 0 <= colour_source < mass.shape[1]:
        raise ValueError(f"colour_source must be in [0, {mass.shape[1]}), got {colour_source}")
    spans = []
    for pos, token in enumerate(tokens):
        weights = "\n".join(f"{label}: {mass[pos, s]:.3f}" for s, label in enumerate(source_labels))
        alpha = float(np.clip(mass[pos, colour_source], 0.0, 1.0))
        spans.append(_span(token, f"rgba(31,119,180,{alpha:.3f})", f"position {pos} {token!r}\n{weights}"))
    legend = (
        f'<div style="font-size:11px;color:#555">shade = mass on source '
        f"<b>{html.escape(source_labels[colour_source])}</b> (0 white, 1 blue); hover a token for all its weights</div>"
    )
    return f'<div class="ar-routing">{legend}<div>{"".join(spans)}</div></div>'


def loss_tokens_html(tokens: Sequence[str], loss_clean: np.ndarray, loss_intervened: np.ndarray) -> str:
    """Each predicted token (positions 1..) shaded by how much the intervention changed its
    loss (red: higher, blue: lower); hover for the clean and intervened loss."""
    delta = loss_intervened - loss_clean
    scale = max(float(np.abs(delta).max()), 1e-6)
    spans = [_span(tokens[0], "#eeeeee", "position 0: no prediction of it")]
    for pos in range(1, len(tokens)):
        d = float(delta[pos - 1])
        colour = f"rgba(214,39,40,{min(1.0, d / scale):.3f})" if d > 0 else f"rgba(31,119,180,{min(1.0, -d / scale):.3f})"
        title = (
            f"position {pos} {tokens[pos]!r}\nloss clean {loss_clean[pos - 1]:.3f}\n"
            f"loss intervened {loss_intervened[pos - 1]:.3f}\nchange {d:+.3f}"
        )
        spans.append(_span(tokens[pos], colour, title))
    legend = (
        '<div style="font-size:11px;color:#555">loss per token: red = higher after the intervention, '
        f"blue = lower (full colour = {scale:.3f} nats); hover for the numbers</div>"
    )
    return f'<div class="ar-loss">{legend}<div>{"".join(spans)}</div></div>'


def predictions_html(result: ExplorerResult, tokens: Sequence[str]) -> str:
    """The metric clean vs intervened and the top-k next-token predictions side by side."""
    rows = []
    for rank, (clean, new) in enumerate(zip(result.top_clean, result.top_intervened), start=1):
        rows.append(
            f"<tr><td>{rank}</td><td><code>{html.escape(repr(clean.token))}</code></td><td>{clean.prob:.3f}</td>"
            f"<td><code>{html.escape(repr(new.token))}</code></td><td>{new.prob:.3f}</td></tr>"
        )
    after = tokens[result.position]
    head = (
        f"<p><b>{html.escape(result.metric_name)}</b>: clean {result.metric_clean:.4f}, intervened "
        f"{result.metric_intervened:.4f} (change {result.metric_delta:+.4f})</p>"
        f"<p>next token after position {result.position} <code>{html.escape(repr(after))}</code>:</p>"
    )
    table = (
        '<table class="ar-top" style="border-collapse:collapse;font-size:12px">'
        "<tr><th>#</th><th>clean</th><th>p</th><th>intervened</th><th>p</th></tr>" + "".join(rows) + "</table>"
    )
    return head + table


def choices_html(choices: Sequence[SliceChoice], label_of: Any) -> str:
    """The chosen interventions as a list (``label_of(router)`` gives ``"L3 attn"``)."""
    if not choices:
        return "<p><i>no interventions: the clean run</i></p>"
    items = []
    for c in choices:
        how = {"scale": f"scale x {c.factor:g}", "patch": f"patch ({c.target}) from the second prompt"}.get(c.mode, c.mode)
        items.append(f"<li>{html.escape(label_of(c.router))} source {c.source}: {html.escape(how)}</li>")
    return f'<ul class="ar-choices">{"".join(items)}</ul>'


def status_html(result: ExplorerResult, n_sublayers: int) -> str:
    if result.rerun_from is None:
        where = "clean run (cached)"
    elif result.rerun_from >= n_sublayers:
        where = "reran the readout only"
    else:
        where = f"reran sublayers {result.rerun_from}..{n_sublayers - 1} from the cached clean prefix"
    return f'<span style="font-size:11px;color:#555">{where}; {1000 * result.seconds:.1f} ms</span>'
