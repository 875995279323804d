"""Routing schedules: what a wrapped vanilla Qwen3 routes, as a checkable fact.

A *schedule* is routing that does not depend on content: every router query is zero, so each
router's logits are constant (0 everywhere, plus the recency bias ``b`` on the last source when
the router has one). The spec gives the resulting weights analytically:

- ``uniform`` (kimi wrap): ``alpha_i = 1 / n`` for a router with ``n`` sources.
- ``recency`` (cumulative wrap, bias ``b``): ``alpha_current = e^b / (e^b + n - 1)`` and
  ``alpha_other = 1 / (e^b + n - 1)``.

:func:`expected_weights_table` lists those predictions per router and source;
:func:`verify_schedule` runs the model and returns the largest deviation of the weights seen
at the router hooks from them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

if TYPE_CHECKING:  # imported for annotations only: the model module imports this one
    from .model import HookedAttnResTransformer

ScheduleKind = Literal["none", "uniform", "recency"]
SCHEDULE_KINDS = ("none", "uniform", "recency")


@dataclass(frozen=True)
class RoutingSchedule:
    """How a model's routing was set when it was wrapped.

    ``kind="none"`` means the routing is learned (or was edited): there is no prediction.
    ``bias`` is the recency bias every router carries under ``kind="recency"``.
    """

    kind: ScheduleKind = "none"
    bias: Optional[float] = None

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule kind must be one of {SCHEDULE_KINDS}, got {self.kind!r}")
        if self.kind == "recency" and (self.bias is None or not math.isfinite(self.bias)):
            raise ValueError(f"a recency schedule needs a finite bias, got {self.bias!r}")
        if self.kind != "recency" and self.bias is not None:
            raise ValueError(f"only a recency schedule has a bias; got bias={self.bias!r} for {self.kind!r}")

    @property
    def is_scheduled(self) -> bool:
        return self.kind != "none"

    def expected_weights(self, n_sources: int, has_bias: bool) -> list[float]:
        """The analytic routing weights of a router with ``n_sources`` sources."""
        if self.kind == "none":
            raise ValueError("a model with learned routing (schedule 'none') has no analytic weights")
        if self.kind == "uniform" or not has_bias:
            return [1.0 / n_sources] * n_sources
        # Computed as a softmax of the logits [0, ..., 0, b] in float64: this is the spec's
        # e^b / (e^b + n - 1) without overflow for a huge b.
        logits = torch.zeros(n_sources, dtype=torch.float64)
        logits[-1] = self.bias
        return torch.softmax(logits, dim=0).tolist()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Union[dict, None]) -> "RoutingSchedule":
        if not data:
            return cls()
        return cls(kind=data.get("kind", "none"), bias=data.get("bias"))


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
