"""``score_edges``: one API for exact and fast edge scores, all returning :class:`EdgeEffects`.

Methods:

- ``"exact"``: every routing edge ablated alone, measured (:class:`AblatedRuns`, the batched
  sweep engine: an edge is a slice);
- ``"eap"`` / ``"eap_ig"``: gradient estimates at the router's read (:mod:`.eap`);
- ``"gradient"``, ``"norm_fix"``, ``"readout"``: the library's slice estimators
  (:func:`attnres_lens.attribution.estimate.estimate_effects`), which estimate the ``zero``
  intervention (``alpha_i := 0``), so they take ``ablation="zero"`` only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from torch import Tensor

from ..attribution.estimate import METHODS as ESTIMATORS
from ..attribution.estimate import estimate_effects
from ..metrics import Metric
from .ablation import Ablation
from .eap import gradient_edge_effects, path_points
from .effects import EdgeEffects
from .graph import DepthGraph
from .runs import AblatedRuns

if TYPE_CHECKING:  # annotations only
    from ..model import HookedAttnResTransformer

METHODS: tuple[str, ...] = ("exact", "eap", "eap_ig") + ESTIMATORS


def resolve_ablation(ablation: Optional[str], corrupt: Any) -> str:
    """The ablation kind: ``"corrupt"`` when corrupted tokens are given, else ``"mean"``."""
    if ablation is None:
        return "corrupt" if corrupt is not None else "mean"
    if ablation != "corrupt" and corrupt is not None:
        raise ValueError(f"corrupt= is the reference of ablation 'corrupt', not of {ablation!r}; use reference=")
    return ablation


def score_edges(
    model: "HookedAttnResTransformer",
    clean: Tensor,
    corrupt: Optional[Tensor] = None,
    *,
    metric: Any = "loss",
    method: str = "exact",
    ablation: Optional[str] = None,
    reference: Optional[Tensor] = None,
    steps: int = 8,
    graph: Optional[DepthGraph] = None,
    progress: bool = False,
) -> EdgeEffects:
    """Score every routing edge of ``model`` on the prompts ``clean`` ``[batch, pos]``.

    ``ablation``: ``"corrupt"`` (the default when ``corrupt`` tokens are given: clean -> corrupt
    edge patching), ``"mean"`` (the default otherwise; over ``reference``, by default the
    prompts themselves) or ``"zero"`` (see :mod:`.ablation`). ``metric``: as in
    ``sweep_sources`` (``"loss"``, ``"kl"``, ``logit_diff_metric(...)`` or a callable); the
    gradient methods need a differentiable one (not ``"kl"``). ``steps``: EAP-IG's points.
    Returns an :class:`EdgeEffects` with one row per routing edge of ``graph`` (default
    ``DepthGraph.from_model(model)``), in its order."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {METHODS}")
    tokens = model.validate_tokens(clean)
    kind = resolve_ablation(ablation, corrupt)
    if method in ESTIMATORS and kind != "zero":
        raise ValueError(f"method {method!r} estimates the 'zero' ablation (alpha_i := 0) only, got ablation "
                         f"{kind!r}; use method 'exact', 'eap' or 'eap_ig' for it")
    if method == "eap_ig" and kind == "zero":
        raise ValueError("method 'eap_ig' with ablation 'zero' is degenerate: moving every read towards 0 together "
                         "scales each router's output, which the sublayer's input RMSNorm undoes, so the path is flat "
                         "almost to its end; use ablation 'mean' or 'corrupt', or method 'eap' or 'readout'")
    resolved = Metric.resolve(metric)
    if method != "exact" and resolved.differentiable() is None:
        raise ValueError(f"metric {resolved.name!r} has value and gradient 0 at the clean run, so method {method!r} "
                         "estimates 0 everywhere; use 'loss' or a logit difference, or method 'exact'")
    points = path_points(steps) if method == "eap_ig" else None
    graph = DepthGraph.from_model(model) if graph is None else graph
    edges = graph.routing_edges
    abl = Ablation.build(model, kind, tokens, corrupt if kind == "corrupt" else reference)
    runs = AblatedRuns.start(model, graph, tokens, resolved, abl, progress)
    if method == "exact":
        effect = runs.metrics([[edge] for edge in edges]) - runs.clean_metric[None, :]
    elif method in ("eap", "eap_ig"):
        effect = gradient_edge_effects(model, tokens, resolved.differentiable(), edges, abl, points or [0.0])
    else:
        effect = _estimator_effects(model, tokens, resolved, method, graph)
    return EdgeEffects(tuple(e.id for e in edges), effect, runs.mass(edges), runs.clean_metric, method, kind)


def _estimator_effects(model: "HookedAttnResTransformer", tokens: Tensor, metric: Metric, method: str,
                       graph: DepthGraph) -> np.ndarray:
    """The estimator's ``zero``-mode slice estimates, row for row in the graph's edge order."""
    table = estimate_effects(model, tokens, mode="zero", metric=metric, method=method, groups="slice",
                             merge_duplicates=True)
    by_key = {(row.router, int(row.source)): row.estimate_per_prompt for row in table.itertuples()}
    return np.stack([np.asarray(by_key[edge.key], dtype=float) for edge in graph.routing_edges])


__all__ = ["METHODS", "resolve_ablation", "score_edges"]
