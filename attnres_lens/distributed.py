"""Sharded execution over ``torch.distributed`` (``torchrun``), and nothing else.

Interpretability sweeps are embarrassingly parallel: every rank holds a full copy of the model,
takes its share of the work items (round-robin, deterministic), and the results are gathered
with ``all_gather_object`` so that every rank sees the same, complete result in the original
order. Without an initialised process group every function here is the single-process identity.

- :func:`init_from_env`: initialise the default process group from ``torchrun``'s environment
  (gloo on CPU, NCCL on GPU) when ``WORLD_SIZE > 1``;
- :func:`rank_device`: ``cuda:{LOCAL_RANK}`` where CUDA is present, else CPU;
- :func:`ordered_map`: ``map`` over work items, sharded, gathered, in order;
- :func:`gather_lists`, :func:`check_same_everywhere`, :func:`barrier`, :func:`is_writer`.

See ``docs/scale.md`` for ``torchrun``, SLURM and multi-node invocations.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

#: The process group's collective timeout in seconds (default 600): a stalled rank ends the run.
TIMEOUT_ENV = "ATTNRES_LENS_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0

Item = TypeVar("Item")
Result = TypeVar("Result")


class RankStalledError(RuntimeError):
    """A rank did not reach a collective within :func:`collective_timeout` (stalled or dead).

    ``ranks`` holds the ranks that did not answer (as far as this rank can tell), ``what`` the
    step that waited for them; callers that know how the run resumes add it with
    :meth:`with_resume`."""

    def __init__(self, message: str, ranks: tuple[int, ...], what: str, resume: str = ""):
        super().__init__(f"{message}; {resume}" if resume else message)
        self.stall, self.ranks, self.what = message, ranks, what

    def with_resume(self, how: str) -> "RankStalledError":
        """The same error, its message ending with ``how`` the run resumes (replacing any
        earlier word on it: the outermost caller knows best)."""
        return RankStalledError(self.stall, self.ranks, self.what, how)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int
    world_size: int
    local_rank: int

    def owns(self, index: int) -> bool:
        """Whether work item ``index`` (of a list every rank agrees on) is this rank's."""
        return index % self.world_size == self.rank


def is_active() -> bool:
    """Whether a process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def ranks() -> Ranks:
    """This process's rank, world size and local rank (0, 1, 0 outside a process group)."""
    if not is_active():
        return Ranks(0, 1, 0)
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def is_writer() -> bool:
    """Whether this process writes shared output (reports, manifests): rank 0, or no group."""
    return ranks().rank == 0


def rank_device() -> torch.device:
    """``cuda:{LOCAL_RANK}`` where CUDA is present, otherwise the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return torch.device("cpu")


def collective_timeout() -> timedelta:
    """How long a collective waits for the other ranks: ``ATTNRES_LENS_DIST_TIMEOUT`` seconds
    (default 600, not torch's 30 minutes)."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {text!r}")
    return timedelta(seconds=seconds)


def init_from_env() -> bool:
    """Initialise the default process group when launched by ``torchrun`` (``WORLD_SIZE > 1``
    in the environment): NCCL when CUDA is present (each rank on ``cuda:{LOCAL_RANK}``), gloo
    otherwise. Returns whether a group of more than one rank is active. Idempotent."""
    if dist.is_available() and dist.is_initialized():
        return is_active()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world_size} but this torch build has no torch.distributed")
    if torch.cuda.is_available():
        torch.cuda.set_device(rank_device())
        dist.init_process_group("nccl", device_id=rank_device(), timeout=collective_timeout())
    else:
        dist.init_process_group("gloo", timeout=collective_timeout())
    return is_active()


def _stalled(err: RuntimeError, what: str) -> RankStalledError:
    """The error naming the rank(s) gloo's monitored barrier reported as not answering: rank 0
    names them; any other rank knows only that rank 0 (which coordinates it) did not answer."""
    found = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(err))
    if found:  # torch names the ranks only in its message text
        stalled = tuple(int(r) for r in found.group(1).replace(" ", "").split(",") if r)
    else:  # rank 0 coordinates the barrier: another rank that timed out waited on rank 0
        stalled = (0,) if dist.get_rank() != 0 else ()
    names = ", ".join(str(r) for r in stalled) or "a rank (torch did not say which)"
    seconds = collective_timeout().total_seconds()
    return RankStalledError(
        f"rank {names} of {dist.get_world_size()} did not reach the {what} within {seconds:g}s "
        f"({TIMEOUT_ENV}): it is stalled or dead, so rank {dist.get_rank()} stops here", stalled, what)


def _check_every_rank_answers(what: str) -> bool:
    """Under gloo, a monitored barrier before each collective: a rank that does not arrive
    within the timeout is named (a plain gloo collective only says it timed out, and after
    that the group is closed, so it must come first). NCCL has no monitored barrier; its own
    watchdog ends a stalled collective after the same timeout. Returns whether it ran."""
    if dist.get_backend() != "gloo":
        return False
    try:
        dist.monitored_barrier(timeout=collective_timeout(), wait_all_ranks=True)
    except RuntimeError as err:
        raise _stalled(err, what) from err
    return True


def barrier(what: str = "barrier") -> None:
    """Wait for every rank (a no-op outside a process group); a rank that does not arrive
    within :func:`collective_timeout` raises :class:`RankStalledError` naming it."""
    if not is_active():
        return
    if not _check_every_rank_answers(what):  # under gloo the monitored barrier is the barrier
        dist.barrier()


def gather_lists(local: list[Any], what: str = "gathering of results") -> list[list[Any]]:
    """Every rank's ``local`` list, indexed by rank, on every rank (picklable objects; tensors
    should be on the CPU). A rank that does not arrive within :func:`collective_timeout` raises
    :class:`RankStalledError` naming it."""
    if not is_active():
        return [local]
    _check_every_rank_answers(what)  # names a stalled rank before the gather can only time out
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, local)
    return out


def check_same_everywhere(what: str, value: Any) -> None:
    """Refuse to go on when ranks disagree on ``value`` (e.g. the hash of the tokens): a rank
    working on other data or another model would silently corrupt the gathered result."""
    values = [part[0] for part in gather_lists([value])]
    if any(v != values[0] for v in values[1:]):
        raise ValueError(
            f"the ranks disagree on the {what}: {values}; every rank must run the same model on the "
            "same data with the same arguments"
        )


def ordered_map(fn: Callable[[Item], Result], items: Sequence[Item]) -> Iterator[Result]:
    """``fn(item)`` for every item, in order, with the items shared round-robin across ranks.

    Each round every rank computes one item and the results are gathered, so memory holds one
    round at a time. Every rank yields every result. ``fn``'s results must be picklable (CPU
    tensors)."""
    where = ranks()
    if where.world_size == 1:
        yield from map(fn, items)
        return
    for first in range(0, len(items), where.world_size):
        index = first + where.rank
        local = [fn(items[index])] if index < len(items) else []
        for part in gather_lists(local):
            yield from part


__all__ = [
    "RankStalledError",
    "Ranks",
    "TIMEOUT_ENV",
    "barrier",
    "check_same_everywhere",
    "collective_timeout",
    "gather_lists",
    "init_from_env",
    "is_active",
    "is_writer",
    "ordered_map",
    "rank_device",
    "ranks",
]
