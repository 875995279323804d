"""The depth graph of a Block AttnRes model: what writes into which source, and which router
reads which source.

Nodes (``Node.kind``):

- ``"embedding"``: the token embedding;
- ``"attn"`` / ``"mlp"``: a sublayer (with ``heads=True`` each attention sublayer is replaced
  by one ``"head"`` node per head);
- ``"source"``: one depth source, i.e. one tensor some router reads. A source is the sum of its
  *members* (the embedding and sublayer outputs, ``cache.source_members``); two sources with
  the same members are the same tensor (the cumulative flavour's snapshot that equals the
  stream), so they are one node;
- ``"router"``: a router (``blocks.{l}.attn_router``, ``blocks.{l}.mlp_router``,
  ``final_router``);
- ``"logits"``: the readout.

Edges (``Edge.kind``):

- ``"writes"``: a member -> the source it is summed into;
- ``"routes"``: a source -> a router that reads it, with mass ``alpha``: the routing edges. A
  source read twice by one router (copies of one tensor) is one edge holding both indices
  (``Edge.sources``), as ``selection.sweep_units(merge_duplicates=True)`` makes one slice of
  them; these are the edges circuits are made of;
- ``"reads"``: a router -> the sublayer (or head) whose input it is, or the final router ->
  the logits;
- ``"readout"``: (cumulative) the stream after the last sublayer -> the logits.

The graph is a plain value: iterate it (``for edge in graph``), filter it
(``graph.filter(kind="routes")``), save and load it (``graph.to_json()`` /
``DepthGraph.from_json(text)``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from ..cache import EMBEDDING, source_members
from ..names import SUBLAYERS
from ..outputs import atomic_write_text
from ..selection import sweep_units

if TYPE_CHECKING:  # annotations only
    from ..model import HookedAttnResTransformer

NODE_KINDS: tuple[str, ...] = ("embedding", "attn", "mlp", "head", "source", "router", "logits")
EDGE_KINDS: tuple[str, ...] = ("writes", "routes", "reads", "readout")
#: The version of the JSON layout :meth:`DepthGraph.to_json` writes.
GRAPH_FORMAT = 1


@dataclass(frozen=True)
class Node:
    """One node: ``id`` (unique in its graph), ``kind`` (:data:`NODE_KINDS`), ``label`` (for
    figures), ``layer`` and ``head`` where they apply, ``step`` (the sublayer index ``k`` of a
    sublayer, head or router, ``2 * n_layers`` for the final router and the logits) and, for a
    source, its ``members`` (component ids: ``-1`` the embedding, ``k`` sublayer ``k``)."""

    id: str
    kind: str
    label: str
    layer: Optional[int] = None
    head: Optional[int] = None
    step: Optional[int] = None
    members: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in NODE_KINDS:
            raise ValueError(f"unknown node kind {self.kind!r}; valid: {NODE_KINDS}")
        object.__setattr__(self, "members", tuple(int(m) for m in self.members))


@dataclass(frozen=True)
class Edge:
    """One edge ``src -> dst`` (node ids) of kind :data:`EDGE_KINDS`. A routing edge also names
    its ``router`` and the source indices it holds there (``sources``: the first holder first;
    two indices for copies of one tensor)."""

    src: str
    dst: str
    kind: str
    router: Optional[str] = None
    sources: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in EDGE_KINDS:
            raise ValueError(f"unknown edge kind {self.kind!r}; valid: {EDGE_KINDS}")
        object.__setattr__(self, "sources", tuple(int(s) for s in self.sources))
        if (self.kind == "routes") != (self.router is not None and bool(self.sources)):
            raise ValueError(f"a routing edge (and only one) names its router and sources, got {self!r}")

    @property
    def id(self) -> str:
        """``"src -> dst"``: unique in a graph."""
        return f"{self.src} -> {self.dst}"

    @property
    def key(self) -> tuple[str, int]:
        """A routing edge's ``(router, first source index)``: the key of its sweep row."""
        if self.kind != "routes":
            raise ValueError(f"only routing edges have a (router, source) key, not {self.id!r} ({self.kind})")
        return (self.router, self.sources[0])  # type: ignore[return-value]

    @property
    def slices(self) -> list[tuple[str, int]]:
        """The ``(router, source)`` pairs a routing edge holds (every copy)."""
        return [(self.router, s) for s in self.sources]  # type: ignore[misc]


def component_node(component: int, heads: Optional[int] = None) -> str:
    """The node id of a component: ``"embed"``, ``"attn.{l}"`` / ``"mlp.{l}"`` (``"attn.{l}.h{h}"``
    for head ``h``)."""
    if component == EMBEDDING:
        return "embed"
    layer, is_mlp = divmod(component, 2)
    base = f"{'mlp' if is_mlp else 'attn'}.{layer}"
    return base if heads is None else f"{base}.h{heads}"


def source_node(members: Sequence[int]) -> str:
    """The node id of the source summing ``members``: ``"src[-1,0,1]"``."""
    return f"src[{','.join(str(m) for m in sorted(members))}]"


@dataclass(frozen=True)
class DepthGraph:
    """The nodes and edges of one model's routed depth (see the module docstring)."""

    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    flavour: str
    n_layers: int
    n_heads: Optional[int] = None  # set when heads were split out
    _index: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        ids = [n.id for n in self.nodes]
        if len(set(ids)) != len(ids):
            raise ValueError("node ids must be unique")
        known = set(ids)
        for edge in self.edges:
            if edge.src not in known or edge.dst not in known:
                raise ValueError(f"edge {edge.id!r} names a node the graph does not hold")
        self._index.update({n.id: n for n in self.nodes})

    # ------------------------------------------------------------------ building
    @classmethod
    def from_model(cls, model: "HookedAttnResTransformer", *, heads: bool = False) -> "DepthGraph":
        """The depth graph of ``model`` (``heads=True``: one node per attention head)."""
        if not isinstance(heads, bool):
            raise TypeError(f"heads must be a bool, got {heads!r}")
        cfg = model.cfg
        members = source_members(cfg)
        n_heads = cfg.n_heads if heads else None
        nodes: dict[str, Node] = {"embed": Node("embed", "embedding", "embed", step=-1)}
        edges: list[Edge] = []
        for k in range(cfg.n_sublayers):
            layer, is_mlp = divmod(k, 2)
            if is_mlp or n_heads is None:
                nid = component_node(k)
                nodes[nid] = Node(nid, "mlp" if is_mlp else "attn", nid.replace(".", " "), layer, step=k)
            else:
                for h in range(n_heads):
                    nid = component_node(k, h)
                    nodes[nid] = Node(nid, "head", f"L{layer}H{h}", layer, h, step=k)
        for spec in model.router_specs:
            nodes[spec.name] = Node(spec.name, "router", _router_label(spec.layer, spec.sublayer),
                                    spec.layer, step=spec.step)
        nodes["logits"] = Node("logits", "logits", "logits", step=cfg.n_sublayers)
        for unit in sweep_units(model, "slice", merge_duplicates=True):
            spec, sources = unit.touched[0]
            held = {frozenset(members[spec.name][i]) for i in sources}
            if len(held) != 1:  # copies of one tensor sum the same components
                raise AssertionError(f"the copies {sources} at {spec.name} do not hold one tensor: {held}")
            label = spec.sources[sources[0]].label
            if unit.family == "current":  # the in-progress source differs at every router
                label = f"{label} (into {_router_label(spec.layer, spec.sublayer)})"
            sid = _add_source(nodes, edges, sorted(next(iter(held))), label, n_heads)
            edges.append(Edge(sid, spec.name, "routes", spec.name, sources))
        for spec in model.router_specs:
            if spec.sublayer == "final":
                edges.append(Edge(spec.name, "logits", "reads"))
            elif spec.sublayer == "attn" and n_heads is not None:
                edges += [Edge(spec.name, component_node(spec.step, h), "reads") for h in range(n_heads)]
            else:
                edges.append(Edge(spec.name, component_node(spec.step), "reads"))
        if model.final_router is None:  # the readout reads the stream after the last sublayer
            stream = list(members[model.router_specs[-1].name][-1]) + [cfg.n_sublayers - 1]
            sid = _add_source(nodes, edges, sorted(stream), "final stream", n_heads)
            edges.append(Edge(sid, "logits", "readout"))
        return cls(tuple(nodes.values()), tuple(edges), cfg.flavour, cfg.n_layers, n_heads)

    # ------------------------------------------------------------------ reading
    def __iter__(self) -> Iterator[Edge]:
        return iter(self.edges)

    def __len__(self) -> int:
        return len(self.edges)

    def node(self, node_id: str) -> Node:
        if node_id not in self._index:
            raise KeyError(f"no node {node_id!r} in this graph; nodes are e.g. {[n.id for n in self.nodes[:6]]}")
        return self._index[node_id]

    def filter(self, predicate: Optional[Callable[[Edge], bool]] = None, *, kind: Optional[str] = None,
               router: Optional[str] = None) -> list[Edge]:
        """The edges of ``kind`` (and at ``router``) for which ``predicate`` holds, in order."""
        if kind is not None and kind not in EDGE_KINDS:
            raise ValueError(f"unknown edge kind {kind!r}; valid: {EDGE_KINDS}")
        return [e for e in self.edges if (kind is None or e.kind == kind) and (router is None or e.router == router)
                and (predicate is None or predicate(e))]

    @property
    def routing_edges(self) -> list[Edge]:
        """The source -> router edges, in forward order of their routers."""
        return self.filter(kind="routes")

    def routing_edge(self, router: str, source: int) -> Edge:
        """The routing edge holding source index ``source`` of ``router`` (any copy)."""
        for edge in self.routing_edges:
            if edge.router == router and source in edge.sources:
                return edge
        raise KeyError(f"no routing edge at {router!r} holds source {source}; routers: "
                       f"{sorted({e.router for e in self.routing_edges})}")

    def edge(self, edge_id: str) -> Edge:
        for e in self.edges:
            if e.id == edge_id:
                return e
        raise KeyError(f"no edge {edge_id!r} in this graph")

    def successors(self, node_id: str, kind: Optional[str] = None) -> list[Edge]:
        return [e for e in self.edges if e.src == node_id and (kind is None or e.kind == kind)]

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {"format": GRAPH_FORMAT, "flavour": self.flavour, "n_layers": self.n_layers, "n_heads": self.n_heads,
                "nodes": [asdict(n) for n in self.nodes], "edges": [asdict(e) for e in self.edges]}

    def to_json(self, path: Any = None) -> str:
        """The graph as JSON text (also written to ``path`` when given)."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_json(cls, text_or_path: Any) -> "DepthGraph":
        """A graph from :meth:`to_json`'s text or a file holding it."""
        data = load_json(text_or_path, "DepthGraph")
        if data.get("format") != GRAPH_FORMAT:
            raise ValueError(f"not a depth graph of format {GRAPH_FORMAT}: format={data.get('format')!r}")
        nodes = tuple(Node(**{**n, "members": tuple(n["members"])}) for n in data["nodes"])
        edges = tuple(Edge(**{**e, "sources": tuple(e["sources"])}) for e in data["edges"])
        return cls(nodes, edges,
                   data["flavour"], data["n_layers"], data["n_heads"])


def _router_label(layer: Optional[int], sublayer: str) -> str:
    if sublayer not in SUBLAYERS:
        raise ValueError(f"unknown sublayer {sublayer!r}")
    return "final router" if layer is None else f"{sublayer} {layer}"


def _add_source(nodes: dict[str, Node], edges: list[Edge], members: list[int], label: str,
                n_heads: Optional[int]) -> str:
    """The source node summing ``members`` (added, with its write edges, on first sight)."""
    sid = source_node(members)
    if sid in nodes:
        return sid
    step = max(members) + 1
    nodes[sid] = Node(sid, "source", label, step=step, members=tuple(members))
    for m in members:
        if m != EMBEDDING and m % 2 == 0 and n_heads is not None:
            edges += [Edge(component_node(m, h), sid, "writes") for h in range(n_heads)]
        else:
            edges.append(Edge(component_node(m), sid, "writes"))
    return sid


def load_json(text_or_path: Any, what: str) -> dict:
    if isinstance(text_or_path, os.PathLike) or (isinstance(text_or_path, str) and not text_or_path.lstrip().startswith("{")):
        with open(text_or_path, encoding="utf-8") as f:
            text = f.read()
    elif isinstance(text_or_path, str):
        text = text_or_path
    else:
        raise TypeError(f"{what}.from_json takes JSON text or a path, got {type(text_or_path).__name__}")
    return json.loads(text)


__all__ = ["DepthGraph", "EDGE_KINDS", "Edge", "GRAPH_FORMAT", "NODE_KINDS", "Node", "component_node", "source_node"]
