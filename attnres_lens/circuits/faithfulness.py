"""Faithfulness: how much of the model's metric a circuit recovers.

``F(c) = (M(c) - M(empty)) / (M(full) - M(empty))``, with ``M(c)`` the metric (mean over prompts)
with every routing edge outside ``c`` ablated, ``M(full)`` the clean run and ``M(empty)`` every
routing edge ablated. ``F = 1``: the circuit does what the model does; ``F = 0``: no better than
nothing. The CI resamples prompts (:func:`~attnres_lens.attribution.bootstrap.bootstrap_statistics`,
the ratio of resampled means, every circuit on the same resamples).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from torch import Tensor

from ..attribution.bootstrap import CI_METHODS, bootstrap_statistics, check_bootstrap_size
from ..metrics import Metric
from .ablation import Ablation
from .circuit import Circuit
from .graph import DepthGraph
from .runs import AblatedRuns
from .scoring import resolve_ablation

if TYPE_CHECKING:  # annotations only
    from ..model import HookedAttnResTransformer


@dataclass(frozen=True, eq=False)
class Faithfulness:
    """Per circuit: ``estimate`` and its CI ``low``/``high``, ``metric`` (``M(c)``); with the
    full and empty runs' ``full`` / ``empty`` metrics (means over prompts) and ``per_prompt``
    ``[circuit, prompt]`` values of ``M(c)``."""

    circuits: tuple[Circuit, ...]
    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray
    metric: np.ndarray
    full: float
    empty: float
    per_prompt: np.ndarray


def measure_faithfulness(runs: AblatedRuns, circuits: Sequence[Circuit], *, n_boot: int = 1000,
                         confidence: float = 0.95, seed: int = 0, ci_method: str = "percentile") -> Faithfulness:
    """The faithfulness of every circuit on the prompts of ``runs`` (one batched exact run per
    circuit, plus the empty one)."""
    if ci_method not in CI_METHODS:
        raise ValueError(f"unknown ci_method {ci_method!r}; valid: {CI_METHODS}")
    graph = runs.graph
    values = runs.metrics([c.outside(graph) for c in circuits] + [graph.routing_edges])
    per_circuit, empty = values[:-1], values[-1:]
    full = runs.clean_metric[None, :]
    if float(full.mean() - empty.mean()) == 0.0:
        raise ValueError("ablating every routing edge leaves the metric unchanged, so faithfulness is undefined "
                         "(M(full) == M(empty)); choose a metric or an ablation that the routing affects")

    def ratio(means: dict) -> dict:
        return {"faithfulness": (means["circuits"] - means["empty"]) / (means["full"] - means["empty"])}

    check_bootstrap_size(per_circuit.shape[1], confidence, n_boot)
    intervals = bootstrap_statistics({"circuits": per_circuit, "full": full, "empty": empty}, ratio,
                                     n_boot=n_boot, confidence=confidence, seed=seed, method=ci_method)
    f = intervals["faithfulness"]
    return Faithfulness(tuple(circuits), f.estimate.ravel(), f.low.ravel(), f.high.ravel(),
                        per_circuit.mean(axis=1), float(full.mean()), float(empty.mean()), per_circuit)


def faithfulness(
    model: "HookedAttnResTransformer",
    circuit: Circuit,
    data: Tensor,
    metric: Any = "loss",
    *,
    corrupt: Optional[Tensor] = None,
    ablation: Optional[str] = None,
    reference: Optional[Tensor] = None,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Faithfulness:
    """``(M(circuit) - M(empty)) / (M(full) - M(empty))`` on the prompts ``data`` with a bootstrap
    CI over prompts. ``ablation`` as in :func:`~attnres_lens.circuits.score_edges` (``"corrupt"``
    when ``corrupt`` is given, else ``"mean"`` over ``reference``, by default ``data``)."""
    tokens = model.validate_tokens(data)
    graph = DepthGraph.from_model(model)
    circuit.check(graph)
    kind = resolve_ablation(ablation, corrupt)
    abl = Ablation.build(model, kind, tokens, corrupt if kind == "corrupt" else reference)
    runs = AblatedRuns.start(model, graph, tokens, Metric.resolve(metric), abl)
    return measure_faithfulness(runs, [circuit], n_boot=n_boot, confidence=confidence, seed=seed)


__all__ = ["Faithfulness", "faithfulness", "measure_faithfulness"]
