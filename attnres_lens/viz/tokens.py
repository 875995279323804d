"""Token-level routing: which tokens read which sources, at one router.

- :func:`token_routing` computes the weights (one prompt, one router) as a plain structure;
- :func:`plot_token_routing` draws them with plotly (sources x tokens, hover per cell);
- :func:`token_routing_circuitsvis` shows them with circuitsvis' coloured tokens, one colour per
  source (optional dependency, with an install hint when absent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from .figures import require_plotly
from .layout import router_label

CIRCUITSVIS_HINT = (
    "token_routing_circuitsvis needs circuitsvis: pip install circuitsvis "
    "(or use plot_token_routing, which only needs plotly)"
)

#: The most token labels of the plotly heatmap (its width is the notebook's, about 1000 pixels).
MAX_PLOTLY_TOKEN_LABELS = 64


@dataclass(frozen=True)
class TokenRouting:
    """The routing weights of one prompt at one router."""

    router: str
    router_label: str
    tokens: list[str]  # one display string per position
    source_labels: list[str]
    families: list[str]
    mass: np.ndarray  # [pos, source], mass per token and source


def display_token(text: str) -> str:
    """A token made printable: control characters escaped, blanks made visible."""
    if not text.strip() or not text.isprintable():
        return text.encode("unicode_escape").decode("ascii").replace(" ", "\u2423")
    return text


def tick_token(text: str) -> str:
    """A token as an axis tick label: :func:`display_token`, and spaces at either end shown as
    ``␣`` (a tick label's leading space is otherwise invisible)."""
    shown = display_token(text)
    body = shown.strip(" ")
    if not body:
        return shown
    start = shown.index(body)
    return "\u2423" * start + body + "\u2423" * (len(shown) - start - len(body))


def tick_step(n_labels: int, room: float, spacing: float) -> int:
    """Label every ``step``-th of ``n_labels`` evenly spaced ticks, so that labels ``spacing``
    apart fit in ``room`` (same units)."""
    return max(1, math.ceil(n_labels * spacing / max(room, spacing)))


def token_axis_title(n_shown: int, n_tokens: int, step: int) -> str:
    """The token axis' title, saying what is left out: positions past ``n_shown`` of
    ``n_tokens``, and labels when only every ``step``-th token is labelled."""
    notes = []
    if n_shown < n_tokens:
        notes.append(f"first {n_shown} of {n_tokens}")
    if step > 1:
        notes.append(f"one in {step} labelled")
    return "token" + (f" ({'; '.join(notes)})" if notes else "")


def resolve_router(model: Any, router: Any) -> str:
    """A router hook prefix from a name, ``(layer, "attn"|"mlp")``, ``"final"``, or ``None``
    (the last router in forward order)."""
    names = [spec.name for spec in model.router_specs]
    if router is None:
        return names[-1]
    if isinstance(router, str) and router in names:
        return router
    if router == "final" and "final_router" in names:
        return "final_router"
    if isinstance(router, tuple) and len(router) == 2 and f"blocks.{router[0]}.{router[1]}_router" in names:
        return f"blocks.{router[0]}.{router[1]}_router"
    raise ValueError(f"unknown router {router!r}; routers are {names} (or (layer, 'attn'|'mlp'), 'final')")


def one_prompt(model: Any, text_or_tokens: Any) -> Tensor:
    """``[1, pos]`` tokens of one prompt (a string or a token tensor)."""
    if isinstance(text_or_tokens, str):
        tokens = model.to_tokens(text_or_tokens)
    elif isinstance(text_or_tokens, Tensor):
        tokens = model.validate_tokens(text_or_tokens)
    else:
        raise TypeError(f"expected a string or a token tensor, got {type(text_or_tokens).__name__}")
    if tokens.shape[0] != 1:
        raise ValueError(f"this view shows one prompt; got a batch of {tokens.shape[0]}")
    return tokens


def token_routing(model: Any, text_or_tokens: Any, router: Any = None, *, max_tokens: Optional[int] = None) -> TokenRouting:
    """The routing weights of one prompt at ``router`` (first ``max_tokens`` positions)."""
    name = resolve_router(model, router)
    tokens = one_prompt(model, text_or_tokens)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[f"{name}.hook_weights"], return_type=None)
    n_pos = tokens.shape[1] if max_tokens is None else min(int(tokens.shape[1]), int(max_tokens))
    spec = {s.name: s for s in model.router_specs}[name]
    return TokenRouting(
        router=name,
        router_label=router_label(spec.layer, spec.sublayer),
        tokens=[display_token(t) for t in model.to_str_tokens(tokens[0, :n_pos])],
        source_labels=[s.label for s in spec.sources],
        families=[s.family for s in spec.sources],
        mass=cache[f"{name}.hook_weights"][0, :n_pos].float().cpu().numpy(),
    )


def plot_token_routing(
    model: Any, text_or_tokens: Any, router: Any = None, *, max_tokens: int = 128
) -> Any:
    """One prompt's routing at one router as an interactive sources x tokens heatmap; hover a
    cell for the token, its position, the source, its family and mass."""
    return token_routing_figure(token_routing(model, text_or_tokens, router, max_tokens=max_tokens))


def token_routing_figure(routing: TokenRouting, *, title: Optional[str] = None) -> Any:
    """The plotly heatmap of a :class:`TokenRouting` (sources x tokens)."""
    go = require_plotly()
    n_pos, n_src = routing.mass.shape
    rows = [f"{label} \u00b7 {fam}" for label, fam in zip(routing.source_labels, routing.families)]
    positions = [f"{i}: {tok}" for i, tok in enumerate(routing.tokens)]
    hover = [
        [f"token {positions[p]!r}<br>source: {routing.source_labels[s]} ({routing.families[s]})"
         f"<br>mass = {routing.mass[p, s]:.3f}" for p in range(n_pos)]
        for s in range(n_src)
    ]
    step = tick_step(n_pos, float(MAX_PLOTLY_TOKEN_LABELS), 1.0)
    labelled = list(range(0, n_pos, step))
    fig = go.Figure(
        go.Heatmap(
            z=routing.mass.T,
            x=list(range(n_pos)),
            y=rows,
            text=hover,
            hovertemplate="%{text}<extra></extra>",
            colorscale="Viridis",
            zmin=0.0,
            zmax=1.0,
            colorbar=dict(title="mass"),
        )
    )
    fig.update_layout(
        title=title or f"Routing per token at {routing.router_label} ({routing.router})",
        xaxis=dict(title=token_axis_title(n_pos, n_pos, step), tickmode="array", tickvals=labelled,
                   ticktext=[tick_token(routing.tokens[p]) for p in labelled], tickangle=-90, tickfont=dict(size=9)),
        yaxis_title="source",
        height=int(200 + 28 * n_src),
    )
    return fig


def token_routing_circuitsvis(
    model: Any, text_or_tokens: Any, router: Any = None, *, max_tokens: int = 128
) -> Any:
    """circuitsvis' ``colored_tokens_multi`` for one router: pick a source to colour the tokens
    by its mass on that source; hover a token for all its masses. Returns circuitsvis' RenderedHTML
    (displays in Jupyter; ``.local_src`` is the self-contained HTML)."""
    try:
        from circuitsvis.tokens import colored_tokens_multi
    except ImportError as err:
        raise ImportError(CIRCUITSVIS_HINT) from err
    routing = token_routing(model, text_or_tokens, router, max_tokens=max_tokens)
    labels = [f"{routing.router_label}: {label} ({fam})" for label, fam in zip(routing.source_labels, routing.families)]
    return colored_tokens_multi(routing.tokens, torch.from_numpy(routing.mass), labels)


