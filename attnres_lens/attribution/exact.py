"""The exact sweep over a dataset of several batches: :func:`~attnres_lens.sweep_plan.execute`
of one plan, by the local or the sharded executor."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from .. import distributed
from ..effects import Effects
from ..metrics import Metric
from ..sweep_plan import Local, SweepResult, SweepSpec, UndefinedInterventionWarning, execute, plan
from ..sweep_sharded import Sharded

if TYPE_CHECKING:  # annotations only
    from ..model import HookedAttnResTransformer


def sweep_batches(
    model: "HookedAttnResTransformer",
    batches: list[torch.Tensor],
    *,
    mode: str,
    metric: Metric,
    groups: Any,
    positions: Any,
    batch_size: Optional[int],
    engine: str,
    bands: Optional[Mapping[str, tuple[int, ...]]],
    progress: bool,
    checkpoint_dir: Optional[Union[str, Path]] = None,
    merge_duplicates: bool = True,
) -> SweepResult:
    """The sweep of every batch as one result: per-prompt values over all prompts in order.
    Rows whose intervention is undefined come back NaN and listed in ``undefined`` (no warning:
    the caller reports them).

    Under an initialised process group (``torchrun``) the (batch x unit) work is shared across
    the ranks and gathered; with ``checkpoint_dir`` every finished unit is recorded there and a
    rerun recomputes only what is missing (:class:`~attnres_lens.sweep_sharded.Sharded`)."""
    spec = SweepSpec(mode=mode, metric=metric, groups=groups, positions=positions, batch_size=batch_size,
                     engine=engine, bands=bands if isinstance(groups, str) and groups == "family_band" else None,
                     merge_duplicates=merge_duplicates, progress=progress)
    sharded = checkpoint_dir is not None or distributed.is_active()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedInterventionWarning)
        effects = execute(plan(model, spec), batches, Sharded(checkpoint_dir) if sharded else Local())
    return SweepResult(effects)


def join_batches(results: list[SweepResult]) -> SweepResult:
    """The sweeps of several batches as one (:meth:`~attnres_lens.effects.Effects.concat`)."""
    return SweepResult(Effects.concat([result.effects for result in results]))


__all__ = ["join_batches", "sweep_batches"]
