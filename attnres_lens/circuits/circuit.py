"""A circuit: a set of routing edges, saved as JSON, run with every other edge ablated."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

from ..interventions import to_hooks
from ..outputs import atomic_write_text
from .ablation import Ablation
from .graph import DepthGraph, Edge, load_json

if TYPE_CHECKING:  # annotations only
    from ..model import HookedAttnResTransformer

#: The version of the JSON layout :meth:`Circuit.to_json` writes.
CIRCUIT_FORMAT = 1


@dataclass(frozen=True)
class Circuit:
    """The routing edges kept (by edge id, ``"src[-1] -> blocks.0.attn_router"``); ``label``
    names it in figures and files."""

    edges: frozenset[str]
    label: str = ""

    def __post_init__(self) -> None:
        edges = frozenset(self.edges)
        if not all(isinstance(e, str) for e in edges):
            raise TypeError(f"a circuit holds edge ids (str), got {sorted(map(repr, edges))[:4]}")
        object.__setattr__(self, "edges", edges)

    @classmethod
    def of(cls, edges: Iterable[Union[Edge, str]], label: str = "") -> "Circuit":
        """A circuit from edges or edge ids."""
        return cls(frozenset(e.id if isinstance(e, Edge) else e for e in edges), label)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.edges))

    def __len__(self) -> int:
        return len(self.edges)

    def __contains__(self, edge: object) -> bool:
        return (edge.id if isinstance(edge, Edge) else edge) in self.edges

    def check(self, graph: DepthGraph) -> None:
        """Raise ``KeyError`` naming every id that is not a routing edge of ``graph``."""
        known = {e.id for e in graph.routing_edges}
        unknown = sorted(self.edges - known)
        if unknown:
            raise KeyError(f"the circuit names {len(unknown)} edge(s) the graph's routing edges do not hold, e.g. "
                           f"{unknown[:3]}; routing edges are e.g. {sorted(known)[:3]}")

    def outside(self, graph: DepthGraph) -> list[Edge]:
        """The routing edges of ``graph`` not in the circuit (the ones a run ablates), in order."""
        self.check(graph)
        return [e for e in graph.routing_edges if e.id not in self.edges]

    def to_json(self, path: Any = None) -> str:
        text = json.dumps({"format": CIRCUIT_FORMAT, "label": self.label, "edges": sorted(self.edges)}, indent=1)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_json(cls, text_or_path: Any) -> "Circuit":
        data = load_json(text_or_path, "Circuit")
        if data.get("format") != CIRCUIT_FORMAT:
            raise ValueError(f"not a circuit of format {CIRCUIT_FORMAT}: format={data.get('format')!r}")
        return cls(frozenset(data["edges"]), data.get("label", ""))


@contextmanager
def circuit_ablated(
    model: "HookedAttnResTransformer",
    circuit: Circuit,
    ablation: str = "mean",
    reference: Any = None,
    graph: Optional[DepthGraph] = None,
) -> Iterator["HookedAttnResTransformer"]:
    """Inside, every forward of ``model`` runs with every routing edge outside ``circuit``
    ablated (``"mean"`` over the ``reference`` tokens per position, ``"corrupt"``: from the
    ``reference`` run, prompt for prompt, or ``"zero"``; see :mod:`.ablation`). Everything is
    validated before a hook is added, and the hooks are removed on every exit::

        with circuit_ablated(model, circuit, "mean", reference=tokens):
            loss = model(tokens, return_type="loss")
    """
    if not isinstance(circuit, Circuit):
        raise TypeError(f"circuit must be a Circuit, got {type(circuit).__name__}")
    graph = DepthGraph.from_model(model) if graph is None else graph
    outside = circuit.outside(graph)
    abl = Ablation.build(model, ablation, None, reference)
    hooks = to_hooks(model, [abl.intervention(outside)]) if outside else []
    with model.hooks(fwd_hooks=hooks):
        yield model


__all__ = ["CIRCUIT_FORMAT", "Circuit", "circuit_ablated"]
