"""First-order (gradient) estimates of zeroing and of masking depth-source slices."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..effects import key_frame
from ..metrics import Metric, non_finite_prompts
from ..selection import SlicePair, resolve_positions, sweep_units
from .data import capture_weights_hooks, in_input_order, prompt_batches, split_batch
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

    def keep_logits(name: str) -> Callable:
        def hook(tensor: Tensor, hook: Any) -> None:
            logit_store[name] = tensor.detach()

        return hook

    hooks += [(spec.id.hook("logits"), keep_logits(spec.name)) for spec in model.router_specs]

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
        not_finite = non_finite_prompts(values)
        if not_finite:
            raise ValueError(
                f"the metric is not finite on the clean run (prompt(s) {not_finite[:10]}); a metric must "
                "return finite values"
            )
        if not values.requires_grad:
            raise ValueError("the metric's value does not depend differentiably on the logits")
        grads = torch.autograd.grad(values.sum(), [store[n] for n in names], allow_unused=True)
    weights = {n: store[n].detach() for n in names}
    gradients = {n: torch.zeros_like(weights[n]) if g is None else g.detach() for n, g in zip(names, grads)}
    return weights, logit_store, gradients, values.detach()


def group_estimates(
    weights: Float[Tensor, "batch pos source"],
    logits: Float[Tensor, "batch pos source"],
    gradient: Float[Tensor, "batch pos source"],
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
    weights, gradient = weights.double(), gradient.double()
    members = list(members)
    zero = -(gradient * weights)[..., members].sum(-1)  # [batch, pos]
    if len(members) == weights.shape[-1]:
        mask = torch.full_like(zero, float("nan"))
    else:
        masked_logits = logits.double().clone()
        masked_logits[..., members] = float("-inf")
        renormalised = torch.softmax(masked_logits, dim=-1)
        mask = (gradient * (renormalised - weights)).sum(-1)
    if pos_mask is not None:
        intervened = pos_mask.to(zero.device)
        zero = zero * intervened
        mask = torch.where(intervened.bool(), mask, torch.zeros_like(mask))
    return zero.sum(-1), mask.sum(-1)


def per_source_estimates(
    weights: Float[Tensor, "batch pos source"],
    logits: Float[Tensor, "batch pos source"],
    gradient: Float[Tensor, "batch pos source"],
    pos_mask: Optional[Float[Tensor, " pos"]],
    need_mask: bool,
) -> dict[str, Optional[Tensor]]:
    """Every source of one router at once (``[batch, source]`` each, summed over the intervened
    positions): the zero and mask estimates of :func:`group_estimates` for single sources, and
    the sums of alpha (``mass``) and of the gradient (``grad``)."""
    weights, gradient = weights.double(), gradient.double()
    n_pos = weights.shape[1]
    intervened = torch.ones(n_pos, dtype=torch.float64, device=weights.device) if pos_mask is None else pos_mask.to(weights.device)
    intervened = intervened[None, :, None]
    out: dict[str, Optional[Tensor]] = {
        "zero": -(gradient * weights * intervened).sum(1),
        "mass": (weights * intervened).sum(1),
        "grad": (gradient * intervened).sum(1),
        "mask": None,
    }
    if need_mask:
        out["mask"] = _single_source_mask_estimates(weights, logits.double(), gradient, intervened)
    return out


def _single_source_mask_estimates(
    weights: Tensor, logits: Tensor, gradient: Tensor, intervened: Tensor
) -> Float[Tensor, "batch source"]:
    """``sum_j g_j (alpha'_j - alpha_j)`` with ``alpha'`` the softmax without source ``i``, for every ``i``."""
    n_batch, n_pos, n_sources = weights.shape
    if n_sources == 1:  # masking a router's only source is undefined
        return torch.full((n_batch, 1), float("nan"), dtype=torch.float64, device=weights.device)
    columns = []
    chunk = max(1, (1 << 24) // max(1, n_batch * n_pos * n_sources))  # sources per chunk: bounded memory
    for start in range(0, n_sources, chunk):
        masked_sources = torch.arange(start, min(n_sources, start + chunk), device=weights.device)
        masked = logits.unsqueeze(-2).repeat(1, 1, len(masked_sources), 1)  # [batch, pos, chunk, source]
        masked[..., torch.arange(len(masked_sources)), masked_sources] = float("-inf")
        delta = torch.softmax(masked, dim=-1) - weights.unsqueeze(-2)
        columns.append(((gradient.unsqueeze(-2) * delta).sum(-1) * intervened).sum(1))  # [batch, chunk]
    return torch.cat(columns, dim=-1)


def gradient_rows(
    model: "HookedAttnResTransformer",
    batches: list[Tensor],
    metric: Any,
    groups: Sequence[Sequence[SlicePair]],
    positions: Any,
    batch_size: Optional[int],
    accumulator: Optional[RoutingAccumulator] = None,
    kinds: tuple[str, ...] = ("zero", "mask"),
) -> dict[str, np.ndarray]:
    """Per-group, per-prompt gradient estimates (``[group, prompt]``) over all batches, for the
    estimates named in ``kinds``; also the per-prompt mean alpha and mean gradient of every
    group (summed over its sources), and the clean ``metric`` per prompt. Zeroing is linear in
    the sources, so a group's zero estimate is the sum of its slices'; a group's mask estimate
    renormalises over the whole set at each router (:func:`group_estimates`). Every chunk's
    routing weights also feed ``accumulator`` when given."""
    metric = Metric.resolve(metric)
    if metric.differentiable() is None:
        raise ValueError(
            "metric 'kl' has value and gradient 0 at the clean run: every first-order estimate is 0 "
            "(use 'loss', a logit difference or another metric that is not minimal at the clean run)"
        )
    sources_by_router = [_sources_by_router(members) for members in groups]
    columns: dict[str, list[Tensor]] = {"zero": [], "mask": [], "mass": [], "grad": []}
    clean_metric = []
    offset = 0
    for batch in batches:
        for chunk in split_batch(batch, batch_size):
            chunk_metric = metric.for_prompts(torch.arange(offset, offset + chunk.shape[0])).differentiable()
            offset += chunk.shape[0]
            weights, logits, gradients, values = gradient_pass(model, chunk, chunk_metric)
            if accumulator is not None:
                accumulator.update(weights)
            estimates = _chunk_estimates(weights, logits, gradients, sources_by_router, positions, "mask" in kinds)
            for name in columns:
                columns[name].append(estimates[name])
            clean_metric.append(values.double().cpu())
    result = {name: torch.cat(parts, 1).numpy() for name, parts in columns.items()}
    result["metric"] = torch.cat(clean_metric).numpy()
    return result


def _sources_by_router(members: Sequence[SlicePair]) -> dict[str, list[int]]:
    by_router: dict[str, list[int]] = {}
    for router, source in members:
        by_router.setdefault(router, []).append(int(source))
    return by_router


def _chunk_estimates(
    weights: dict[str, Tensor],
    logits: dict[str, Tensor],
    gradients: dict[str, Tensor],
    sources_by_router: list[dict[str, list[int]]],
    positions: Any,
    need_mask: bool,
) -> dict[str, Tensor]:
    """The estimates of one chunk of prompts, ``[group, prompt]`` each."""
    n_prompts, n_pos = next(iter(weights.values())).shape[:2]
    pos_mask = positions_mask(positions, n_pos)
    n_read = n_pos if pos_mask is None else float(pos_mask.sum())
    routers = {router for group in sources_by_router for router in group}
    per_source = {
        router: per_source_estimates(weights[router], logits[router], gradients[router], pos_mask, need_mask)
        for router in routers
    }
    out = {name: torch.zeros(len(sources_by_router), n_prompts, dtype=torch.float64) for name in ("zero", "mask", "mass", "grad")}
    for row, group in enumerate(sources_by_router):
        for router, sources in group.items():
            at_router = per_source[router]
            out["zero"][row] += at_router["zero"][:, sources].sum(-1).cpu()
            out["mass"][row] += (at_router["mass"][:, sources].sum(-1) / n_read).cpu()
            out["grad"][row] += (at_router["grad"][:, sources].sum(-1) / n_read).cpu()
            if not need_mask:
                continue
            if len(sources) == 1:
                out["mask"][row] += at_router["mask"][:, sources[0]].cpu()
            else:  # a set renormalises together: not the sum of its single-source estimates
                _, group_mask = group_estimates(weights[router], logits[router], gradients[router], sources, pos_mask)
                out["mask"][row] += group_mask.cpu()
    if not need_mask:
        out["mask"].fill_(float("nan"))
    return out


def gradient_attribution(
    model: "HookedAttnResTransformer",
    tokens: Any,
    metric: Any = "loss",
    *,
    positions: Any = None,
    batch_size: Optional[int] = None,
    merge_duplicates: bool = True,
    attention_mask: Optional[Tensor] = None,
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

    ``merge_duplicates`` (default): copies of one tensor at a router are one slice, as in
    :func:`~attnres_lens.patching.sweep_sources` (its estimates are those of the set: zeroing
    sums over the copies, masking renormalises over the rest).

    Columns: ``router, layer, sublayer, source, family, label, n_copies``, ``mass`` (mean
    alpha), ``grad`` (mean ``g_i`` per token), ``zero_estimate``, ``mask_estimate``,
    ``metric_clean``, and the per-prompt arrays ``zero_estimate_per_prompt`` and
    ``mask_estimate_per_prompt``.

    ``tokens``: a token tensor, a list of them, or strings. A padded ``[batch, pos]`` tensor
    takes its ``attention_mask`` (1 = real token; strings derive it): its prompts are unpadded
    and run by length, so each prompt's estimate is the one it has alone (pads never enter a
    sum), the means are over prompts, and the per-prompt arrays are in input order.
    """
    batches, rows = prompt_batches(model, tokens, attention_mask)
    metric = Metric.resolve(metric).for_prompts(torch.tensor(rows))
    units = sweep_units(model, "slice", merge_duplicates=merge_duplicates)
    table = key_frame(units)  # the key columns' dtypes of every results table
    groups = [unit.slices for unit in units]
    estimates = {name: in_input_order(values, rows)
                 for name, values in gradient_rows(model, batches, metric, groups, positions, batch_size).items()}
    table["mass"] = estimates["mass"].mean(1)
    table["grad"] = estimates["grad"].mean(1)
    table["zero_estimate"] = estimates["zero"].mean(1)
    table["mask_estimate"] = estimates["mask"].mean(1)
    table["metric_clean"] = float(estimates["metric"].mean())
    table["zero_estimate_per_prompt"] = list(estimates["zero"])
    table["mask_estimate_per_prompt"] = list(estimates["mask"])
    return table



__all__ = ["gradient_attribution", "gradient_pass", "gradient_rows", "group_estimates", "per_source_estimates", "positions_mask"]
