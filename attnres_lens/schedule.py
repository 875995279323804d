"""Routing schedules: what a wrapped vanilla Qwen3 routes, as a checkable fact.

A *schedule* is routing that does not depend on content: every router query is zero, so each
router's logits are constant (0 everywhere, plus the recency bias ``b`` on the last source when
the router has one). The resulting weights are analytic (``docs/concepts.md``, "Schedules"):

- ``uniform`` (kimi wrap): ``alpha_i = 1 / n`` for a router with ``n`` sources.
- ``recency`` (cumulative wrap, bias ``b``): ``alpha_current = e^b / (e^b + n - 1)`` and
  ``alpha_other = 1 / (e^b + n - 1)``.

:func:`expected_weights_table` lists those predictions per router and source;
:func:`verify_schedule` runs the model and returns the largest deviation of the weights seen
at the router hooks from them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

# The schedule value lives with the config (the model holds one); it is re-exported here.
from .config import SCHEDULE_KINDS, RoutingSchedule, ScheduleKind

if TYPE_CHECKING:  # annotations only: this module reads a model, it never builds one
    from .model import HookedAttnResTransformer

__all__ = ["SCHEDULE_KINDS", "RoutingSchedule", "ScheduleKind", "expected_weights_table",
           "observed_weights", "verify_schedule"]


def expected_weights_table(model: "HookedAttnResTransformer") -> pd.DataFrame:
    """One row per (router, source) of :meth:`source_table`, with column ``expected_weight``:
    the schedule's analytic prediction (for plotting prediction against observation)."""
    schedule = _require_schedule(model)
    table = model.source_table()
    expected = []
    for spec, router in model.routers():
        expected += schedule.expected_weights(spec.n_sources, router.bias is not None)
    table["expected_weight"] = expected
    return table


def observed_weights(
    model: "HookedAttnResTransformer", tokens: Int[Tensor, "batch pos"]
) -> dict[str, Tensor]:
    """Routing weights ``[batch, pos, source]`` of every router, read at ``hook_weights``."""
    names = [f"{spec.name}.hook_weights" for spec in model.router_specs]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names, return_type=None)
    return {spec.name: cache[f"{spec.name}.hook_weights"] for spec in model.router_specs}


def verify_schedule(model: "HookedAttnResTransformer", tokens: Any) -> float:
    """Max absolute deviation between the routing weights seen at the hooks on ``tokens`` and
    the analytic schedule the model was wrapped with (``model.schedule``).

    Raises ``ValueError`` for a model whose routing is learned rather than scheduled."""
    _require_schedule(model)
    if isinstance(tokens, (str, list)):
        tokens = model.to_tokens(tokens)
    table = expected_weights_table(model)
    observed = observed_weights(model, tokens)
    worst = 0.0
    for router, rows in table.groupby("router", sort=False):
        expected = torch.tensor(rows["expected_weight"].to_numpy(), dtype=torch.float64)
        seen = observed[router].double()
        worst = max(worst, float((seen - expected).abs().max()))
    return worst


def _require_schedule(model: "HookedAttnResTransformer") -> RoutingSchedule:
    schedule = model.schedule
    if not schedule.is_scheduled:
        raise ValueError(
            "this model's routing is learned, not scheduled (model.schedule.kind == 'none'), so "
            "there is no analytic schedule to verify; schedules come from wrapping a vanilla Qwen3 "
            "with from_pretrained(..., schedule='uniform' | 'recency')"
        )
    return schedule
