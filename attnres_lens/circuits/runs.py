"""Exact runs with sets of edges ablated, on the batched sweep engine.

Every set is one row of :func:`attnres_lens.sweep_engine.run_batched`: it reruns from the first
router it touches, several sets stacked in one forward, each with one
:class:`~attnres_lens.interventions.Intervention` ablating all its edges. An edge is a slice
(every copy of one source at one router), so exact edge patching *is* a sweep over slices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..metrics import Metric
from ..sweep_engine import CleanRun, Rerun, clean_pass, default_budget, first_position, run_batched
from .ablation import Ablation
from .graph import DepthGraph, Edge

if TYPE_CHECKING:  # annotations only
    from ..model import HookedAttnResTransformer


@dataclass
class AblatedRuns:
    """The clean run of ``tokens`` and everything needed to measure ablated edge sets on it."""

    model: "HookedAttnResTransformer"
    graph: DepthGraph
    tokens: Tensor
    metric: Metric
    ablation: Ablation
    clean: CleanRun
    clean_metric: np.ndarray  # [prompt]
    progress: bool = False

    @classmethod
    def start(cls, model: "HookedAttnResTransformer", graph: DepthGraph, tokens: Tensor, metric: Metric,
              ablation: Ablation, progress: bool = False) -> "AblatedRuns":
        clean = clean_pass(model, tokens)
        value = metric(clean.logits, tokens, _log_probs(metric, clean)).cpu().double().numpy()
        return cls(model, graph, tokens, metric, ablation, clean, value, progress)

    def metrics(self, sets: Sequence[Sequence[Edge]]) -> np.ndarray:
        """The metric ``[set, prompt]`` with each set's edges ablated (an empty set: the clean run)."""
        out = np.tile(self.clean_metric, (len(sets), 1))
        n_pos = self.tokens.shape[1]
        reruns = []
        for i, edges in enumerate(sets):
            if edges:
                iv = self.ablation.intervention(edges)
                start = min(self.graph.node(edge.dst).step for edge in edges)
                reruns.append(Rerun(i, iv, start, first_position(iv, n_pos)))
        budget = default_budget(self.model, self.tokens.numel())
        with tqdm(total=len(reruns), disable=not self.progress, desc="circuit runs") as bar:
            results = run_batched(self.model, self.tokens, reruns, self.metric, self.clean,
                                  _log_probs(self.metric, self.clean), budget, bar)
        for i, values in results.items():
            out[i] = values.cpu().double().numpy()
        return out

    def mass(self, edges: Sequence[Edge]) -> np.ndarray:
        """Each edge's clean routing mass ``[edge, prompt]`` (see :func:`edge_mass`)."""
        read = self.metric.read_positions(self.tokens.shape[1])
        return edge_mass(self.clean.weights, edges, read)


def edge_mass(weights: dict[str, Tensor], edges: Sequence[Edge], read: Sequence[int]) -> np.ndarray:
    """Per edge and prompt: the clean weight of the edge's sources (copies summed), averaged over
    the positions ``read`` (those the metric scores), as a sweep's slice ``mass``."""
    rows = []
    for edge in edges:
        w = weights[edge.router]  # [batch, pos, source]
        picked = w[:, torch.tensor(list(read), device=w.device)][:, :, torch.tensor(edge.sources, device=w.device)]
        rows.append(picked.float().sum(dim=-1).mean(dim=-1).cpu().double().numpy())
    return np.stack(rows) if rows else np.zeros((0, next(iter(weights.values())).shape[0]))


def _log_probs(metric: Metric, clean: CleanRun) -> Optional[Tensor]:
    return F.log_softmax(clean.logits.float(), dim=-1) if metric.fn == "kl" else None


__all__ = ["AblatedRuns", "edge_mass"]
