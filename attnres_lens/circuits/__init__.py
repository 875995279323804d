"""Depth circuits: routing edges as a circuit graph, edge scores (exact, EAP, EAP-IG and the
library's estimators), path patching, circuits, faithfulness and discovery (``docs/circuits.md``).

One concept per module: :mod:`.graph` (the depth graph), :mod:`.ablation` (what an ablated edge
carries), :mod:`.runs` (exact runs of ablated edge sets on the batched engine), :mod:`.eap`
(gradient scores), :mod:`.scoring` (``score_edges``), :mod:`.effects` (the result),
:mod:`.circuit` (``Circuit``, ``circuit_ablated``), :mod:`.faithfulness`, :mod:`.discover`,
:mod:`.paths` (path patching) and :mod:`.figure` (the plotly circuit graph).
"""

from .ablation import ABLATIONS, Ablation
from .circuit import Circuit, circuit_ablated
from .discover import DISCOVERY_METHODS, FaithfulnessCurve, discover
from .effects import EdgeEffects
from .figure import circuit_figure
from .faithfulness import Faithfulness, faithfulness
from .graph import DepthGraph, Edge, Node
from .scoring import METHODS, score_edges

__all__ = [
    "ABLATIONS",
    "Ablation",
    "Circuit",
    "DISCOVERY_METHODS",
    "DepthGraph",
    "Edge",
    "EdgeEffects",
    "Faithfulness",
    "FaithfulnessCurve",
    "METHODS",
    "Node",
    "circuit_ablated",
    "circuit_figure",
    "discover",
    "faithfulness",
    "score_edges",
]
