"""Circuit discovery on the depth graph: the faithfulness curve of each method.

- ``"exact_greedy"`` (ACDC-style pruning, exact): start from every routing edge; each round
  measures, exactly and batched, the metric with each remaining edge also ablated, and prunes
  the ``per_round`` edges whose removal moves the metric least from the full model's. The
  circuits along the way are nested, one per size.
- a fast ranking (``"eap"``, ``"eap_ig"``, ``"exact"`` single-edge scores, or an estimator):
  the top-``k`` edges by ``|score|``, for every ``k``.

Either way every circuit on the curve is then *evaluated exactly* (:func:`measure_faithfulness`),
so a fast ranking is judged by the circuits it picks, not by its own numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from torch import Tensor

from ..metrics import Metric
from .ablation import Ablation
from .circuit import Circuit
from .faithfulness import Faithfulness, measure_faithfulness
from .graph import DepthGraph, Edge
from .runs import AblatedRuns
from .scoring import METHODS as SCORE_METHODS
from .scoring import resolve_ablation, score_edges

DISCOVERY_METHODS: tuple[str, ...] = ("exact_greedy",) + tuple(m for m in SCORE_METHODS if m != "exact") + ("exact",)

if TYPE_CHECKING:  # annotations only
    from ..model import HookedAttnResTransformer


@dataclass(frozen=True, eq=False)
class FaithfulnessCurve:
    """Faithfulness against edges kept for one method: ``sizes[j]`` edges, circuit
    ``faithfulness.circuits[j]``; ``order`` lists the edges from most to least important (the
    greedy's reverse pruning order, or the ranking)."""

    method: str
    sizes: np.ndarray
    order: tuple[str, ...]
    faithfulness: Faithfulness

    def circuit(self, k: int) -> Circuit:
        """The circuit of ``k`` edges on this curve."""
        matches = np.flatnonzero(self.sizes == k)
        if not len(matches):
            raise KeyError(f"the curve has no circuit of {k} edges; sizes: {self.sizes.tolist()}")
        return self.faithfulness.circuits[int(matches[0])]

    def at(self, k: int) -> float:
        """The faithfulness of the ``k``-edge circuit."""
        return float(self.faithfulness.estimate[int(np.flatnonzero(self.sizes == k)[0])])

    @property
    def auc(self) -> float:
        """The area under faithfulness against the fraction of edges kept (trapezoids, 0 .. 1)."""
        x = self.sizes / self.sizes.max()
        order = np.argsort(x)
        return float(np.trapezoid(self.faithfulness.estimate[order], x[order]))


def discover(
    model: "HookedAttnResTransformer",
    data: Tensor,
    metric: Any = "loss",
    method: str = "exact_greedy",
    *,
    corrupt: Optional[Tensor] = None,
    ablation: Optional[str] = None,
    reference: Optional[Tensor] = None,
    sizes: Optional[Sequence[int]] = None,
    steps: int = 8,
    per_round: int = 1,
    n_boot: int = 1000,
    seed: int = 0,
) -> FaithfulnessCurve:
    """The faithfulness curve of ``method`` (:data:`DISCOVERY_METHODS`) on the prompts ``data``.

    ``ablation``/``corrupt``/``reference`` as in :func:`~attnres_lens.circuits.score_edges`;
    ``sizes``: the circuit sizes to evaluate (default every size ``0 .. n_edges``); ``steps``:
    EAP-IG's points; ``per_round``: edges the greedy prunes per round (1: the full greedy, about
    ``n_edges**2 / 2`` batched runs)."""
    if method not in DISCOVERY_METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {DISCOVERY_METHODS}")
    if isinstance(per_round, bool) or not isinstance(per_round, int) or per_round < 1:
        raise ValueError(f"per_round must be an int >= 1, got {per_round!r}")
    tokens = model.validate_tokens(data)
    graph = DepthGraph.from_model(model)
    n_edges = len(graph.routing_edges)
    sizes = _check_sizes(sizes, n_edges)
    kind = resolve_ablation(ablation, corrupt)
    abl = Ablation.build(model, kind, tokens, corrupt if kind == "corrupt" else reference)
    runs = AblatedRuns.start(model, graph, tokens, Metric.resolve(metric), abl)
    if method == "exact_greedy":
        order = greedy_order(runs, per_round)
    else:
        scores = score_edges(model, tokens, corrupt, metric=metric, method=method, ablation=kind,
                             reference=reference, steps=steps, graph=graph)
        order = tuple(scores.ranking())
    circuits = [Circuit.of(order[:k], label=f"{method} top {k}") for k in sizes]
    result = measure_faithfulness(runs, circuits, n_boot=n_boot, seed=seed)
    return FaithfulnessCurve(method, np.asarray(sizes), order, result)


def greedy_order(runs: AblatedRuns, per_round: int = 1) -> tuple[str, ...]:
    """The routing edges from most to least important by exact greedy pruning: each round
    ablates, on top of the edges pruned so far, each remaining edge in turn and prunes the
    ``per_round`` whose removal leaves the mean metric closest to the full model's."""
    remaining: list[Edge] = list(runs.graph.routing_edges)
    pruned: list[Edge] = []
    target = float(runs.clean_metric.mean())
    while remaining:
        values = runs.metrics([pruned + [edge] for edge in remaining]).mean(axis=1)
        gap = np.abs(values - target)
        chosen = np.argsort(gap, kind="stable")[:per_round].tolist()
        pruned += [remaining[i] for i in chosen]
        remaining = [edge for i, edge in enumerate(remaining) if i not in chosen]
    return tuple(edge.id for edge in reversed(pruned))


def _check_sizes(sizes: Optional[Sequence[int]], n_edges: int) -> list[int]:
    if sizes is None:
        return list(range(n_edges + 1))
    out = sorted({int(k) for k in sizes})
    bad = [k for k in out if not 0 <= k <= n_edges]
    if bad or not out:
        raise ValueError(f"sizes must be circuit sizes in 0..{n_edges} (the routing edges), got {list(sizes)}")
    return out


__all__ = ["DISCOVERY_METHODS", "FaithfulnessCurve", "discover", "greedy_order"]
