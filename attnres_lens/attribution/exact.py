"""The exact sweep over a dataset of several batches (``patching.run_sweep`` on each)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from .. import distributed
from ..effects import Effects
from ..metrics import Metric
from ..patching import SweepResult, UndefinedInterventionWarning, run_sweep
from .sharded import sharded_sweep

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
    """:func:`attnres_lens.patching.run_sweep` on every batch; per-prompt arrays are
    concatenated across batches and the means recomputed over all prompts. Rows whose
    intervention is undefined come back NaN and listed in ``undefined`` (no warning: the
    caller reports them).

    Under an initialised process group (``torchrun``) the (batch x unit) work is shared across
    the ranks and gathered; with ``checkpoint_dir`` every finished unit is recorded there and a
    rerun recomputes only what is missing (:mod:`.sharded`)."""
    if checkpoint_dir is not None or distributed.is_active():
        sweep_kwargs = dict(mode=mode, groups=groups, positions=positions, batch_size=batch_size, engine=engine,
                            bands=bands if isinstance(groups, str) and groups == "family_band" else None,
                            merge_duplicates=merge_duplicates)
        return join_batches(sharded_sweep(model, batches, metric=metric, sweep_kwargs=sweep_kwargs,
                                          checkpoint_dir=checkpoint_dir, progress=progress))
    results = []
    offset = 0
    for batch in batches:
        n_prompts = int(batch.shape[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedInterventionWarning)
            results.append(run_sweep(
                model, batch, mode=mode, metric=metric.for_prompts(torch.arange(offset, offset + n_prompts)),
                groups=groups, positions=positions, batch_size=batch_size, engine=engine,
                bands=bands if isinstance(groups, str) and groups == "family_band" else None,
                progress=progress, merge_duplicates=merge_duplicates,
            ))
        offset += n_prompts
    return join_batches(results)


def join_batches(results: list[SweepResult]) -> SweepResult:
    """The sweeps of several batches as one (:meth:`~attnres_lens.effects.Effects.concat`)."""
    return SweepResult(Effects.concat([result.effects for result in results]))


__all__ = ["join_batches", "sweep_batches"]
