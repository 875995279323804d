"""Path patching over depth routes: a node's effect along one route of the depth graph only.

A route is a walk of node ids ``sender -> source -> router -> node -> source -> router -> ... ->
logits`` (:class:`~attnres_lens.circuits.DepthGraph` edges ``writes``, ``routes``, ``reads``;
cumulative models end ``... -> final stream -> logits`` through the ``readout`` edge). The
sender (the embedding, a sublayer, or with ``heads=True`` graphs an attention head) takes its
value from the corrupted run; its change ``d`` then travels along the route only:

1. the router of the next hop reads its source as ``clean + d`` (every copy of it at that
   router); every other reader of that source, at that router or any other, reads it clean;
2. the node the router feeds (a sublayer, or one head of it) is recomputed from that read, and
   its change becomes the new ``d``;
3. at the end the logits are computed with ``d`` added to what the readout reads (the final
   router's source, or the cumulative final stream) and the metric compared with the clean run.

This is TransformerLens' path patching (sender -> receivers, everything off the path frozen
clean) on the routed graph: a source is a sum of its members, so "the sender's corrupted value in
this receiver's input only" is ``clean + d`` at that one read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from torch import Tensor

from ..metrics import Metric
from .ablation import sources_hook
from .graph import DepthGraph, Edge, Node

if TYPE_CHECKING:  # annotations only
    from ..model import HookedAttnResTransformer

SENDER_KINDS: tuple[str, ...] = ("embedding", "attn", "mlp", "head")


def route_edges(graph: DepthGraph, route: Sequence[str]) -> list[Edge]:
    """The edges of ``route`` (node ids) in ``graph``, checked: it starts at a sender, alternates
    writes -> routes -> reads, and ends at the logits."""
    route = list(route)
    if len(route) < 3 or route[-1] != "logits":
        raise ValueError(f"a route runs from a sender to 'logits' (at least sender -> source -> ... -> logits), got {route}")
    if graph.node(route[0]).kind not in SENDER_KINDS:
        raise ValueError(f"a route starts at the embedding, a sublayer or a head, not at {route[0]!r} "
                         f"({graph.node(route[0]).kind})")
    edges = []
    for src, dst in zip(route, route[1:]):
        found = [e for e in graph.successors(src) if e.dst == dst]
        if not found:
            kinds = [f"{e.dst} ({e.kind})" for e in graph.successors(src)]
            raise ValueError(f"the route steps {src!r} -> {dst!r}, which is no edge of the graph; from {src!r} "
                             f"the edges go to {kinds[:8]}")
        edges.append(found[0])
    return edges


def path_patch(
    model: "HookedAttnResTransformer",
    clean: Tensor,
    corrupt: Tensor,
    route: Sequence[str],
    metric: Any = "loss",
    *,
    graph: Optional[DepthGraph] = None,
) -> np.ndarray:
    """The effect per prompt, ``M(path patched) - M(clean)``, of the ``route``'s sender taking its
    value from ``corrupt`` along ``route`` only (see the module docstring). A route through a
    head needs ``graph = DepthGraph.from_model(model, heads=True)`` (made so when a route names a
    head and no graph is given)."""
    tokens, corrupt = model.validate_tokens(clean), model.validate_tokens(corrupt)
    if tuple(corrupt.shape) != tuple(tokens.shape):
        raise ValueError(f"corrupt has shape {tuple(corrupt.shape)} but clean {tuple(tokens.shape)}")
    if graph is None:
        graph = DepthGraph.from_model(model, heads=any(".h" in node for node in route))
    edges = route_edges(graph, route)
    resolved = Metric.resolve(metric)
    sender = graph.node(route[0])
    with torch.no_grad():
        delta = _node_output(model, corrupt, sender, []) - _node_output(model, tokens, sender, [])
        read: Optional[Edge] = None
        for edge in edges[1:]:
            if edge.kind in ("routes", "readout"):
                read = edge
            elif edge.kind == "reads" and edge.dst != "logits":
                node = graph.node(edge.dst)
                patched = _node_output(model, tokens, node, [_add_at_read(model, read, delta)])
                delta = patched - _node_output(model, tokens, node, [])
        logits = model.run_with_hooks(tokens, fwd_hooks=[_add_at_read(model, read, delta)])
        base = model(tokens)
    return (resolved(logits, tokens) - resolved(base, tokens)).cpu().double().numpy()


def _add_at_read(model: "HookedAttnResTransformer", edge: Edge, delta: Tensor) -> tuple[str, Callable]:
    """A hook adding ``delta`` to what ``edge`` carries: a router's read of its source (every
    copy), or the cumulative readout's stream."""
    if edge.kind == "readout":
        def add_to_stream(x: Tensor, hook: Any) -> Tensor:
            return x + delta.to(x.dtype)

        return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", add_to_stream
    sources = list(edge.sources)

    def add_to_read(x: Tensor, hook: Any) -> Tensor:
        x = x.clone()
        x[:, :, sources] = x[:, :, sources] + delta.to(x.dtype).unsqueeze(2)
        return x

    return sources_hook(edge.router), add_to_read


def _node_output(model: "HookedAttnResTransformer", tokens: Tensor, node: Node, hooks: list) -> Tensor:
    """What ``node`` writes into its sources in a run of ``tokens`` with ``hooks``."""
    if node.kind == "embedding":
        name = "hook_embed"
    elif node.kind == "head":
        name = f"blocks.{node.layer}.attn.hook_z"
    else:
        name = f"blocks.{node.layer}.hook_{node.kind}_out"
    captured: dict[str, Tensor] = {}

    def keep(x: Tensor, hook: Any) -> None:
        captured["x"] = x.detach()

    model.run_with_hooks(tokens, fwd_hooks=hooks + [(name, keep)])
    if node.kind != "head":
        return captured["x"]
    w_o = model.blocks[node.layer].attn.W_O[node.head]  # [d_head, d_model]
    return captured["x"][:, :, node.head] @ w_o.to(captured["x"].dtype)


__all__ = ["SENDER_KINDS", "path_patch", "route_edges"]
