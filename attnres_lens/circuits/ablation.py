"""What an ablated edge carries instead of its clean value.

An edge ``source -> router`` is the router's read of that source (every copy of it). Ablating
it changes that read only; every other router still reads the clean source:

- ``"corrupt"``: ``v_i := v_i`` of the corrupted run at that router (``mode="patch"``,
  ``target="source"``): the router's keys follow, TransformerLens' edge-patching meaning;
- ``"mean"``: ``v_i :=`` its mean over a reference batch, per position (``mode="mean"``,
  ``target="source"``);
- ``"zero"``: ``alpha_i := 0`` (``mode="zero"``): the edge leaves the router's sum and the other
  weights stay as they are. To first order this is ``v_i := 0`` (the key norm is scale
  invariant), which is the point the gradient methods move ``v_i`` to.

:class:`Ablation` holds the reference activations once and turns a set of edges into one
validated :class:`~attnres_lens.interventions.Intervention`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from ..interventions import Group, Intervention
from .graph import Edge

if TYPE_CHECKING:  # annotations only
    from ..model import HookedAttnResTransformer

ABLATIONS: tuple[str, ...] = ("corrupt", "mean", "zero")


def sources_hook(router: str) -> str:
    """The hook of a router's stacked sources ``[batch, pos, source, d_model]``."""
    return f"{router}.hook_sources"


@dataclass(frozen=True, eq=False)
class Ablation:
    """How ablated edges are replaced, with the reference run's sources where the kind needs
    them (``values``: ``{router hook_sources: tensor}``)."""

    kind: str
    values: Optional[dict[str, Tensor]] = None

    @classmethod
    def build(cls, model: "HookedAttnResTransformer", kind: str, tokens: Optional[Tensor], reference: Any = None) -> "Ablation":
        """Validate ``kind`` and run the reference: ``"corrupt"`` needs ``reference`` (corrupted
        tokens of the same shape as ``tokens``), ``"mean"`` takes a reference batch (default:
        ``tokens`` themselves), ``"zero"`` takes none. ``tokens=None`` (a context manager,
        whose runs come later) leaves the shape checks to the hooks."""
        if not isinstance(kind, str) or kind not in ABLATIONS:
            raise ValueError(f"unknown ablation {kind!r}; valid: {ABLATIONS}")
        if kind == "zero":
            if reference is not None:
                raise ValueError("ablation 'zero' takes no reference (corrupt= / reference=)")
            return cls(kind)
        if reference is None and (kind == "corrupt" or tokens is None):
            raise ValueError(f"ablation {kind!r} needs reference tokens "
                             f"({'the corrupted prompts' if kind == 'corrupt' else 'the batch to average over'})")
        reference = model.validate_tokens(tokens if reference is None else reference)
        if tokens is not None:
            _check_reference_shape(kind, reference, tokens)
        names = [sources_hook(spec.name) for spec in model.router_specs]
        with torch.no_grad():
            _, cache = model.run_with_cache(reference, names_filter=names)
        return cls(kind, {name: cache.cache_dict[name] for name in names})

    def intervention(self, edges: Sequence[Edge]) -> Intervention:
        """One intervention ablating every edge of ``edges`` together."""
        slices = tuple(pair for edge in edges for pair in edge.slices)
        if not slices:
            raise ValueError("no edge to ablate")
        where = Group(slices=slices, label=f"{len(edges)} edges")
        if self.kind == "zero":
            return Intervention(where, "zero")
        mode = "patch" if self.kind == "corrupt" else "mean"
        return Intervention(where, mode, target="source", value=self.values)

    def baseline(self, router: str, clean: Tensor) -> Tensor:
        """Where the gradient methods move the router's sources ``clean`` ``[batch, pos, source,
        d_model]`` to: the corrupted run's, the reference mean, or zero."""
        if self.kind == "zero":
            return torch.zeros_like(clean)
        values = self.values[sources_hook(router)].to(clean.device, clean.dtype)
        return values if self.kind == "corrupt" else values.mean(dim=0, keepdim=True).expand_as(clean)


def _check_reference_shape(kind: str, reference: Tensor, tokens: Tensor) -> None:
    if kind == "corrupt" and tuple(reference.shape) != tuple(tokens.shape):
        raise ValueError(f"corrupted tokens have shape {tuple(reference.shape)} but the clean tokens "
                         f"{tuple(tokens.shape)}: prompt b is patched from corrupted prompt b")
    if kind == "mean" and reference.shape[1] != tokens.shape[1]:
        raise ValueError(f"the mean reference has {reference.shape[1]} positions but the tokens "
                         f"{tokens.shape[1]}: the mean is taken per position")


__all__ = ["ABLATIONS", "Ablation", "sources_hook"]
