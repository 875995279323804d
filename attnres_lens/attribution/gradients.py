"""First-order (gradient) estimates of zeroing and of masking depth-source slices."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..metrics import Metric
from ..selection import SlicePair, resolve_positions
from .data import as_batches, capture_weights_hooks, split_batch
from .routing_stats import RoutingAccumulator

if TYPE_CHECKING:  # annotations only
    from ..model import HookedAttnResTransformer


def positions_mask(positions: Any, n_pos: int) -> Optional[Float[Tensor, " n_pos"]]:
    """1.0 at the intervened positions, 0.0 elsewhere (``None``: every position)."""
    chosen = resolve_positions(positions, n_pos)
    if chosen is None:
        return None
    mask = torch.zeros(n_pos, dtype=torch.float64)
    mask[chosen] = 1.0
    return mask


def gradient_pass(
    model: "HookedAttnResTransformer", tokens: Int[Tensor, "batch pos"], metric_fn: Callable[..., Tensor]
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], Tensor]:
    """One forward and one backward: the routing weights and logits of every router and the
    gradient of the per-prompt metric with respect to the weights (``[batch, pos, source]``
    each). Prompts do not interact, so the gradient of the *sum* of the per-prompt metrics gives
    every prompt's own gradient."""
    store: dict[str, Tensor] = {}
    logit_store: dict[str, Tensor] = {}
    hooks = capture_weights_hooks(model, store)

    def keep_logits(tensor: Tensor, hook: Any) -> None:
        logit_store[hook.name.rsplit(".hook_logits", 1)[0]] = tensor.detach()

    hooks += [(f"{spec.name}.hook_logits", keep_logits) for spec in model.router_specs]

    def make_leaf(tensor: Tensor, hook: Any) -> Tensor:
        # A fresh leaf at the embedding: the graph exists whatever the parameters'
        # requires_grad, and autograd.grad computes no parameter gradient.
        return tensor.detach().requires_grad_(True)

    names = [spec.name for spec in model.router_specs]
    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", make_leaf), *hooks])
        values = metric_fn(logits, tokens)
        if not isinstance(values, Tensor) or values.shape != (tokens.shape[0],):
            raise ValueError(
                "the metric must return one value per prompt, a tensor of shape "
                f"[{tokens.shape[0]}], got "
                f"{tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__}"
            )
        if not values.requires_grad:
            raise ValueError("the metric's value does not depend differentiably on the logits")
        grads = torch.autograd.grad(values.sum(), [store[n] for n in names], allow_unused=True)
    weights = {n: store[n].detach() for n in names}
    gradients = {n: torch.zeros_like(weights[n]) if g is None else g.detach() for n, g in zip(names, grads)}
    return weights, logit_store, gradients, values.detach()


def group_estimates(
    w: Float[Tensor, "batch pos source"],
    logits: Float[Tensor, "batch pos source"],
    g: Float[Tensor, "batch pos source"],
    members: Sequence[int],
    pos_mask: Optional[Float[Tensor, " pos"]],
) -> tuple[Float[Tensor, " batch"], Float[Tensor, " batch"]]:
    """Per-prompt first-order estimates, at one router, of zeroing and of masking the sources
    ``S = members`` (``[batch]`` each, summed over the intervened positions).

    zero: ``alpha'_S = 0`` -> ``dL ~ -sum_{i in S} g_i alpha_i``.
    mask: ``alpha'_j = alpha_j / (1 - s)`` off ``S`` (``s = sum_S alpha``), ``0`` on ``S`` ->
    ``dL ~ sum_j g_j (alpha'_j - alpha_j) = (s G - sum_S g_i alpha_i) / (1 - s)`` with
    ``G = sum_j g_j alpha_j``; for one source ``alpha_i (G - g_i) / (1 - alpha_i)``. The
    renormalised ``alpha'`` is computed as the softmax of the logits with ``S`` removed, which
    stays exact where ``alpha_S`` rounds to 1. NaN where ``S`` is every source (masking is
    undefined)."""
    w = w.double()
    g = g.double()
    idx = list(members)
    ga = g * w
    zero = -ga[..., idx].sum(-1)  # [batch, pos]
    if len(idx) == w.shape[-1]:
        mask = torch.full_like(zero, float("nan"))
    else:
        masked_logits = logits.double().clone()
        masked_logits[..., idx] = float("-inf")
        renormalised = torch.softmax(masked_logits, dim=-1)
        mask = (g * (renormalised - w)).sum(-1)
    if pos_mask is not None:
        pm = pos_mask.to(zero.device)
        zero = zero * pm
        mask = torch.where(pm.bool(), mask, torch.zeros_like(mask))
    return zero.sum(-1), mask.sum(-1)


def per_sourcegroup_estimates(
    w: Float[Tensor, "batch pos source"],
    logits: Float[Tensor, "batch pos source"],
    g: Float[Tensor, "batch pos source"],
    pos_mask: Optional[Float[Tensor, " pos"]],
    need_mask: bool,
) -> dict[str, Optional[Tensor]]:
    """Every source of one router at once (``[batch, source]`` each, summed over the intervened
    positions): the zero and mask estimates of :func:`_estimates` for single sources, and the
    sums of alpha and of the gradient."""
    w = w.double()
    g = g.double()
    pm = torch.ones(w.shape[1], dtype=torch.float64, device=w.device) if pos_mask is None else pos_mask.to(w.device)
    pm = pm[None, :, None]
    out: dict[str, Optional[Tensor]] = {
        "zero": -(g * w * pm).sum(1),
        "mass": (w * pm).sum(1),
        "grad": (g * pm).sum(1),
        "mask": None,
    }
    if need_mask:
        b, p, n = w.shape
        if n == 1:
            out["mask"] = torch.full((b, 1), float("nan"), dtype=torch.float64, device=w.device)
        else:
            cols = []
            step = max(1, (1 << 24) // max(1, b * p * n))  # sources per chunk: bounded memory
            for start in range(0, n, step):
                idx = torch.arange(start, min(n, start + step), device=w.device)
                masked = logits.double().unsqueeze(-2).repeat(1, 1, len(idx), 1)  # [b, p, k, n]
                masked[..., torch.arange(len(idx)), idx] = float("-inf")
                delta = torch.softmax(masked, dim=-1) - w.unsqueeze(-2)
                cols.append(((g.unsqueeze(-2) * delta).sum(-1) * pm).sum(1))  # [b, k]
            out["mask"] = torch.cat(cols, dim=-1)
    return out


def gradient_rows(
    model: "HookedAttnResTransformer",
    batches: list[Tensor],
    metric: Any,
    groups: Sequence[Sequence[tuple[str, int]]],
    positions: Any,
    batch_size: Optional[int],
    acc: Optional[RoutingAccumulator] = None,
    kinds: tuple[str, ...] = ("zero", "mask"),
) -> dict[str, np.ndarray]:
    """Per-group, per-prompt gradient estimates (``[group, prompt]``) over all batches, for the
    estimates named in ``kinds``; also the per-prompt mean alpha and mean gradient of every
    group (summed over its sources). Zeroing is linear in the sources, so a group's zero
    estimate is the sum of its slices'; a group's mask estimate renormalises over the whole set
    at each router (:func:`_estimates`)."""
    metric = Metric.resolve(metric)
    if metric.differentiable() is None:
        raise ValueError(
            "metric 'kl' has value and gradient 0 at the clean run: every first-order estimate is 0 "
            "(use 'loss', a logit difference or another metric that is not minimal at the clean run)"
        )
    need_mask = "mask" in kinds
    cols: dict[str, list[Tensor]] = {"zero": [], "mask": [], "mass": [], "grad": []}
    metric_vals = []
    by_router: list[dict[str, list[int]]] = []
    for members in groups:
        per: dict[str, list[int]] = {}
        for router, source in members:
            per.setdefault(router, []).append(int(source))
        by_router.append(per)
    used = {router for per in by_router for router in per}
    offset = 0
    for batch in batches:
        for chunk in split_batch(batch, batch_size):
            fn = metric.for_prompts(torch.arange(offset, offset + chunk.shape[0])).differentiable()
            offset += chunk.shape[0]
            weights, logits, gradients, values = gradient_pass(model, chunk, fn)
            if acc is not None:
                acc.update(weights)
            pos_mask = positions_mask(positions, chunk.shape[1])
            n_read = chunk.shape[1] if pos_mask is None else float(pos_mask.sum())
            src = {
                r: per_sourcegroup_estimates(weights[r], logits[r], gradients[r], pos_mask, need_mask) for r in used
            }
            out = {k: torch.zeros(len(groups), chunk.shape[0], dtype=torch.float64) for k in cols}
            for k, per in enumerate(by_router):
                for router, idx in per.items():
                    s = src[router]
                    out["zero"][k] += s["zero"][:, idx].sum(-1).cpu()
                    out["mass"][k] += (s["mass"][:, idx].sum(-1) / n_read).cpu()
                    out["grad"][k] += (s["grad"][:, idx].sum(-1) / n_read).cpu()
                    if not need_mask:
                        continue
                    if len(idx) == 1:
                        out["mask"][k] += s["mask"][:, idx[0]].cpu()
                    else:
                        _, mk = group_estimates(weights[router], logits[router], gradients[router], idx, pos_mask)
                        out["mask"][k] += mk.cpu()
            if not need_mask:
                out["mask"].fill_(float("nan"))
            for k in cols:
                cols[k].append(out[k])
            metric_vals.append(values.double().cpu())
    result = {k: torch.cat(v, 1).numpy() for k, v in cols.items()}
    result["metric"] = torch.cat(metric_vals).numpy()
    return result


def gradient_attribution(
    model: "HookedAttnResTransformer",
    tokens: Any,
    metric: Any = "loss",
    *,
    positions: Any = None,
    batch_size: Optional[int] = None,
) -> pd.DataFrame:
    """First-order estimates of the effect of zeroing and of masking every depth-source slice,
    all from one forward and one backward pass per batch.

    With ``g_i = d metric / d alpha_i`` at each token (the total derivative: routers downstream
    react to the change, as they do in the exact sweep) and ``G = sum_j alpha_j g_j`` (the
    router's alpha-weighted gradient), summed over the intervened positions and averaged over
    prompts:

    - ``zero_estimate = -alpha_i g_i``. Zeroing moves ``alpha_i`` by ``-alpha_i`` and leaves the
      others alone (attribution patching; the sign makes it an estimate of
      ``effect = ablated - clean``, so it is ``-(alpha_i dL/dalpha_i)``).
    - ``mask_estimate = alpha_i (G - g_i) / (1 - alpha_i)``. Masking renormalises:
      ``alpha'_j = alpha_j / (1 - alpha_i)`` for ``j != i`` and ``alpha'_i = 0``, so the first-order
      change ``sum_j g_j (alpha'_j - alpha_j) = alpha_i/(1-alpha_i) sum_{j != i} g_j alpha_j -
      g_i alpha_i`` simplifies to this; it is evaluated as ``sum_j g_j (alpha'_j - alpha_j)`` with
      ``alpha'`` the softmax of the logits without ``i`` (exact even where ``alpha_i`` rounds to
      1). NaN for a router's only source (masking it is undefined).

    ``metric``: ``"loss"`` (mean next-token loss per prompt), a callable ``(logits, tokens) ->
    [batch]`` such as :func:`attnres_lens.patching.logit_diff_metric`; ``"kl"`` is refused (its
    gradient at the clean run is 0). ``positions``: only these positions are intervened on.

    Columns: ``router, layer, sublayer, source, family, label``, ``mass`` (mean alpha), ``grad``
    (mean ``g_i`` per token), ``zero_estimate``, ``mask_estimate``, ``metric_clean``, and the
    per-prompt arrays ``zero_estimate_per_prompt`` and ``mask_estimate_per_prompt``.
    """
    batches = as_batches(model, tokens)
    table = model.source_table()
    groups = [[(r, int(s))] for r, s in zip(table["router"], table["source"])]
    res = gradient_rows(model, batches, metric, groups, positions, batch_size)
    table["mass"] = res["mass"].mean(1)
    table["grad"] = res["grad"].mean(1)
    table["zero_estimate"] = res["zero"].mean(1)
    table["mask_estimate"] = res["mask"].mean(1)
    table["metric_clean"] = float(res["metric"].mean())
    table["zero_estimate_per_prompt"] = list(res["zero"])
    table["mask_estimate_per_prompt"] = list(res["mask"])
    return table



__all__ = ["gradient_attribution", "gradient_pass", "gradient_rows", "group_estimates", "per_source_estimates", "positions_mask"]
