"""The sharded, checkpointed sweep: kept under this name for existing imports; it lives in
:mod:`attnres_lens.sweep_sharded` (the executor ``Sharded``)."""

from ..sweep_sharded import MAX_UNITS_PER_ITEM, Sharded, WorkItem, n_chunks_for, plan_items, record_key, sweep_manifest

__all__ = ["MAX_UNITS_PER_ITEM", "Sharded", "WorkItem", "n_chunks_for", "plan_items", "record_key", "sweep_manifest"]
