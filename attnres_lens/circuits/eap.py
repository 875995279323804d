"""Edge attribution patching (EAP) and its integrated-gradients form (EAP-IG) on routing edges.

An edge ``source i -> router r`` is router ``r``'s read ``v_i`` (``hook_sources[..., i, :]``).
Ablating a set of edges moves their reads to baselines ``b`` (:meth:`Ablation.baseline`), every
later read following what changed before it. Give each edge a coefficient ``a_e`` and let its
read be ``(1 - a_e) v_e + a_e b_e`` (``v_e`` what the router would read in this forward): ``a = 0``
is the clean run, ``a_e = 1`` ablates edge ``e``. Then ``dM/da_e = (b_e - v_e) . G_e`` with ``G_e``
the total derivative of the metric with respect to that read (later reads following), summed
over positions, d_model and the edge's copies. The methods estimate the effect of ablating
edge ``e`` alone, ``M(a_e = 1) - M(clean)``, per prompt:

- ``"eap"``: ``dM/da_e`` at the clean run (``a = 0``): one forward and one backward (the
  baseline's forward for ``"corrupt"`` is run once by :class:`Ablation`);
- ``"eap_ig"``: ``dM/da_e`` averaged over ``steps`` points of the path where every edge moves
  together (``a = t`` for all, ``t`` at the midpoints ``(j + 1/2) / steps``): one forward and
  one backward per step. The scores of all edges sum, as ``steps`` grows, to
  ``M(every edge ablated) - M(clean)`` (completeness; a test checks it).

Batch items never interact, so the gradient of the summed metric is every prompt's own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .ablation import Ablation, sources_hook
from .graph import Edge

if TYPE_CHECKING:  # annotations only
    from ..model import HookedAttnResTransformer


def path_points(steps: int) -> list[float]:
    """The midpoints ``(j + 1/2) / steps`` of the interpolation (``steps >= 1``)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return [(j + 0.5) / steps for j in range(steps)]


def gradient_edge_effects(
    model: "HookedAttnResTransformer",
    tokens: Tensor,
    metric: Callable[[Tensor, Tensor], Tensor],
    edges: Sequence[Edge],
    ablation: Ablation,
    points: Sequence[float],
) -> np.ndarray:
    """The estimated effect ``[edge, prompt]`` of ablating each edge alone: ``dM/da_e``
    averaged over the path points ``points`` (``[0.0]``: EAP; :func:`path_points`: EAP-IG)."""
    baselines: dict[str, Tensor] = {}
    total = np.zeros((len(edges), tokens.shape[0]))
    for t in points:
        reads, grads = _reads_and_gradients(model, tokens, metric, ablation, baselines, float(t))
        for row, edge in enumerate(edges):
            s = list(edge.sources)
            delta = (baselines[edge.router] - reads[edge.router])[:, :, s]
            total[row] += (delta * grads[edge.router][:, :, s]).sum(dim=(1, 2, 3)).double().cpu().numpy()
    return total / len(points)


def _reads_and_gradients(
    model: "HookedAttnResTransformer",
    tokens: Tensor,
    metric: Callable[[Tensor, Tensor], Tensor],
    ablation: Ablation,
    baselines: dict[str, Tensor],
    t: float,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One forward with every read at ``(1 - t) v + t b`` and its backward: per router the
    reads ``v`` of this forward (before moving) and ``dM/d(read)``. ``baselines`` is filled on
    the first call (the clean reads define the zero and mean baselines' shapes)."""
    reads: dict[str, Tensor] = {}
    offsets: dict[str, Tensor] = {}

    def hook_for(router: str) -> Callable:
        def hook(x: Tensor, hook: object) -> Tensor:
            if router not in baselines:
                baselines[router] = ablation.baseline(router, x.detach().float())
            reads[router] = x.detach().float()
            offsets[router] = torch.zeros_like(x, requires_grad=True)
            return (1 - t) * x + t * baselines[router].to(x.dtype) + offsets[router]

        return hook

    hooks = [(sources_hook(spec.name), hook_for(spec.name)) for spec in model.router_specs]
    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        total = torch.as_tensor(metric(logits, tokens)).float().sum()
        routers = list(offsets)
        grads = torch.autograd.grad(total, [offsets[r] for r in routers], allow_unused=True)
    return reads, {r: (torch.zeros_like(reads[r]) if g is None else g.float()) for r, g in zip(routers, grads)}


__all__ = ["gradient_edge_effects", "path_points"]
