"""The sweep executor :class:`Sharded`: the work sharded over ranks, checkpointed unit by
unit, resumable. It imports the core sweep (:mod:`attnres_lens.sweep_plan`), never the reverse.

The work is (prompt batch x sweep unit). Units are dealt into strided chunks (chunk ``c`` holds
units ``c, c + n, c + 2n, ...``, so every chunk mixes cheap deep units with costly shallow
ones), and a work item is one batch x the still-missing units of one chunk; items go to ranks
round-robin (:mod:`attnres_lens.distributed`). Every finished unit becomes one record
(:mod:`attnres_lens.records`) holding its per-prompt mass and effect on that batch; the
gathered records rebuild, batch by batch, the same tables as the single-process sweep, so the
bootstrap that follows sees the same per-prompt values.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed
from .effects import Effects
from .records import RecordStore, model_hash, tokens_hash
from .selection import SweepUnit
from .serialize import jsonable
from .sweep_plan import SweepPlan, UndefinedInterventionWarning, measure

if TYPE_CHECKING:  # annotations only
    from .model import HookedAttnResTransformer

#: With a checkpoint directory, at most this many units per work item (finer checkpoints, at
#: the price of one clean pass per item).
MAX_UNITS_PER_ITEM = 32


@dataclass(frozen=True)
class WorkItem:
    """One batch x some units of the sweep (indices into the full list of units)."""

    batch: int
    units: tuple[int, ...]


def record_key(batch: int, unit: int) -> str:
    return f"{batch}:{unit}"


def n_chunks_for(n_units: int, world_size: int, checkpointed: bool) -> int:
    """Chunks of units per batch: one per rank (each item costs a clean pass); with a
    checkpoint directory, at least 4 per rank and at most :data:`MAX_UNITS_PER_ITEM` units each."""
    if not checkpointed:
        return max(1, min(n_units, world_size))
    return max(1, min(n_units, max(4 * world_size, math.ceil(n_units / MAX_UNITS_PER_ITEM))))


def plan_items(n_batches: int, n_units: int, n_chunks: int, done: set[str]) -> list[WorkItem]:
    """The work items still to do, in an order every rank agrees on."""
    items = []
    for batch in range(n_batches):
        for chunk in range(n_chunks):
            missing = tuple(u for u in range(chunk, n_units, n_chunks) if record_key(batch, u) not in done)
            if missing:
                items.append(WorkItem(batch, missing))
    return items


def sweep_manifest(model: "HookedAttnResTransformer", batches: list[torch.Tensor], settings: Mapping[str, Any],
                   units: list[SweepUnit]) -> dict[str, Any]:
    """The identity of a sweep: model, tokens, settings and its units."""
    return {
        "kind": "sweep_batches",
        "model_sha256": model_hash(model),
        "tokens_sha256": tokens_hash(batches),
        "settings": jsonable(dict(settings)),
        "units": [unit.label for unit in units],
    }


@dataclass(frozen=True)
class Sharded:
    """Runs a plan as work items over the ranks of the process group (if any), each finished
    unit recorded in ``checkpoint_dir`` (if given) and read back from there on a rerun instead
    of being recomputed; every rank gets the same :class:`~attnres_lens.effects.Effects`."""

    checkpoint_dir: Optional[Union[str, Path]] = None

    def run(self, plan: SweepPlan, batches: list[torch.Tensor]) -> Effects:
        return Effects.concat(sharded_batches(plan, batches, self.checkpoint_dir))


def sharded_batches(plan: SweepPlan, batches: list[torch.Tensor], checkpoint_dir: Optional[Union[str, Path]]) -> list[Effects]:
    """One :class:`~attnres_lens.effects.Effects` per batch (see :class:`Sharded`). A rank that
    stalls raises :class:`~attnres_lens.distributed.RankStalledError` naming it and saying how
    the run resumes."""
    try:
        return _sharded_batches(plan, batches, checkpoint_dir)
    except distributed.RankStalledError as err:
        raise err.with_resume(resume_hint(checkpoint_dir)) from err


def resume_hint(checkpoint_dir: Optional[Union[str, Path]]) -> str:
    """How a sweep stopped midway resumes."""
    if checkpoint_dir is None:
        return ("nothing was recorded (no checkpoint_dir), so a rerun starts over; pass checkpoint_dir= to make "
                "the run resumable")
    return (f"the units finished so far are recorded in {str(checkpoint_dir)!r}: rerun the same command with "
            "the same checkpoint_dir to resume from them")


def _sharded_batches(plan: SweepPlan, batches: list[torch.Tensor], checkpoint_dir: Optional[Union[str, Path]]) -> list[Effects]:
    spec, units = plan.spec, list(plan.units)
    if spec.reference is not None:
        raise NotImplementedError(
            "a sharded or checkpointed sweep does not take reference= (its tokens or cache would have "
            "to travel to every rank and into the manifest); run it without checkpoint_dir in one process"
        )
    manifest = sweep_manifest(plan.model, batches, spec.manifest(), units)
    distributed.check_same_everywhere("model, tokens and sweep settings", manifest)
    where = distributed.ranks()
    store = _open_store(checkpoint_dir, manifest, where)
    records = store.load().records if store is not None else {}
    distributed.barrier()  # every rank has read the same records before any rank writes more
    n_chunks = n_chunks_for(len(units), where.world_size, store is not None)
    items = plan_items(len(batches), len(units), n_chunks, set(records))
    offsets = np.cumsum([0] + [int(b.shape[0]) for b in batches])
    mine = [item for index, item in enumerate(items) if where.owns(index)]
    computed: list[dict] = []
    bar = tqdm(total=len(mine), disable=not (spec.progress and where.rank == 0), desc="sweep work items")
    try:
        for item in mine:
            batch_metric = spec.metric.for_prompts(torch.arange(int(offsets[item.batch]), int(offsets[item.batch + 1])))
            for record in _compute_item(plan, batches[item.batch], item, batch_metric):
                if store is not None:
                    store.append(record)
                computed.append(record)
            bar.update(1)
    finally:
        bar.close()
        if store is not None:
            store.close()
    for part in distributed.gather_lists(computed):
        for record in part:
            records.setdefault(record["key"], record)
    return [_batch_effects(records, batch, plan) for batch in range(len(batches))]


def _open_store(checkpoint_dir: Optional[Union[str, Path]], manifest: dict, where: distributed.Ranks) -> Optional[RecordStore]:
    if checkpoint_dir is None:
        return None
    store = RecordStore(checkpoint_dir, manifest, tag=f"r{where.rank}")
    if where.rank == 0:
        store.write_or_check_manifest()
    distributed.barrier()
    if where.rank != 0:
        store.check_manifest()
    return store


def _compute_item(plan: SweepPlan, tokens: torch.Tensor, item: WorkItem, metric: Any) -> list[dict]:
    """The records of one work item: per unit, its per-prompt mass and effect on the batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedInterventionWarning)
        effects = measure(plan, tokens, metric=metric, unit_indices=list(item.units), progress=False)
    return [{**record, "key": record_key(item.batch, record["unit"]), "batch": item.batch,
             "label": str(effects.units[row].label), "attrs": dict(effects.settings)}
            for row, record in enumerate(effects.records(unit_ids=item.units))]


def _batch_effects(records: Mapping[str, dict], batch: int, plan: SweepPlan) -> Effects:
    """The result of one batch, rebuilt from its records (one per unit)."""
    missing = [unit.label for u, unit in enumerate(plan.units) if record_key(batch, u) not in records]
    if missing:
        raise RuntimeError(f"batch {batch}: no result for {len(missing)} unit(s) ({missing[:5]}); this is a bug")
    mine = [records[record_key(batch, u)] for u in range(len(plan.units))]
    return Effects.from_records(plan.units, plan.grouping, mine, mine[0]["attrs"])


__all__ = ["MAX_UNITS_PER_ITEM", "Sharded", "WorkItem", "n_chunks_for", "plan_items", "record_key", "sharded_batches",
           "sweep_manifest"]
