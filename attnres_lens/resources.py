"""How much memory a run can have, so that one that cannot fit is refused before it starts.

A process can be stopped by any of several limits, and the machine's free memory is only one:

- the machine: Linux ``MemAvailable`` (free pages plus reclaimable cache);
- the cgroup (a container's or a systemd slice's ``memory.max``, v2, or
  ``memory.limit_in_bytes``, v1), minus what the group already uses, not counting the page cache
  it can drop (``inactive_file``), at this process's group and every group above it;
- ``RLIMIT_AS`` (``ulimit -v``), minus the address space the process already maps, and
  ``RLIMIT_DATA`` (``ulimit -d``), minus its data segments.

:func:`available_memory` is the smallest headroom, with where it comes from, so a refusal can
say which limit it met. This module imports no torch.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

#: A cgroup limit at or above this is "no limit" (v1 writes 2^63 rounded down to pages).
_V1_UNLIMITED = 1 << 62


@dataclass(frozen=True)
class MemoryHeadroom:
    """Bytes a run may still allocate under one limit, and which limit (``source``)."""

    n_bytes: int
    source: str

    def __str__(self) -> str:
        return f"{gib(self.n_bytes)} ({self.source})"


def memory_headrooms(proc: Union[str, os.PathLike] = "/proc") -> list[MemoryHeadroom]:
    """Every limit this process is under that says how much it may still allocate (empty when
    none does, as on a platform without ``/proc``); ``proc`` is where procfs is mounted."""
    proc = Path(proc)
    found = [_machine(proc), *_cgroup_headrooms(proc), *_rlimit_headrooms(proc)]
    return [headroom for headroom in found if headroom is not None]


def available_memory(proc: Union[str, os.PathLike] = "/proc") -> Optional[MemoryHeadroom]:
    """The smallest of :func:`memory_headrooms`: what a run can allocate before some limit stops
    it; ``None`` when nothing says."""
    return min(memory_headrooms(proc), key=lambda headroom: headroom.n_bytes, default=None)


def available_memory_on(device: Any) -> Optional[MemoryHeadroom]:
    """What a run on ``device`` (a ``torch.device``) can allocate: a CUDA device's free memory,
    else :func:`available_memory` (torch is imported only for a CUDA device)."""
    if getattr(device, "type", None) == "cuda":
        import torch

        return MemoryHeadroom(torch.cuda.mem_get_info(device)[0], f"free on {device}")
    return available_memory()


def gib(n_bytes: Union[int, float]) -> str:
    """``n_bytes`` as ``"12.3 GiB"``."""
    return f"{n_bytes / 2**30:.1f} GiB"


# ============================================================================ the machine
def _machine(proc: Path) -> Optional[MemoryHeadroom]:
    available = _field_kib(proc / "meminfo", "MemAvailable")
    if available is not None:
        return MemoryHeadroom(available, "the machine's available memory, MemAvailable")
    try:
        return MemoryHeadroom(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "the machine's free memory")
    except (ValueError, OSError, AttributeError):
        return None


def _field_kib(path: Path, name: str) -> Optional[int]:
    """Field ``name`` (``"Name:   123 kB"``) of a procfs file, in bytes."""
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(":")
            if key == name:
                return int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# ============================================================================ process limits
def _rlimit_headrooms(proc: Path) -> list[Optional[MemoryHeadroom]]:
    limits = (
        (resource.RLIMIT_AS, "VmSize", "RLIMIT_AS (ulimit -v) of {limit}, of which this process maps {used}"),
        (resource.RLIMIT_DATA, "VmData", "RLIMIT_DATA (ulimit -d) of {limit}, of which this process uses {used}"),
    )
    found = []
    for which, field, text in limits:
        soft, _ = resource.getrlimit(which)
        used = _field_kib(proc / "self" / "status", field)
        if soft == resource.RLIM_INFINITY or used is None:
            continue
        found.append(MemoryHeadroom(max(soft - used, 0), text.format(limit=gib(soft), used=gib(used))))
    return found


# ============================================================================ cgroups
def _cgroup_headrooms(proc: Path) -> list[Optional[MemoryHeadroom]]:
    """The headroom at this process's memory cgroup and each group above it that has a limit."""
    return [_cgroup_headroom(directory, version) for directory, version in _memory_cgroups(proc)]


def _memory_cgroups(proc: Path) -> list[tuple[Path, int]]:
    """``(directory, version)`` of this process's memory cgroup and its ancestors, up to the
    mount of that hierarchy, from ``/proc/self/cgroup`` and ``/proc/self/mountinfo``."""
    try:
        membership = (proc / "self" / "cgroup").read_text().splitlines()
        mounts = (proc / "self" / "mountinfo").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in membership:  # "4:memory:/a/b" (v1) or "0::/a/b" (v2)
        hierarchy, _, rest = line.partition(":")
        controllers, _, group = rest.partition(":")
        version = 2 if hierarchy == "0" and not controllers else 1
        if version == 1 and "memory" not in controllers.split(","):
            continue
        mount = _cgroup_mount(mounts, version)
        if mount is not None:
            found += [(directory, version) for directory in _group_dirs(*mount, group)]
    return found


def _cgroup_mount(mounts: list[str], version: int) -> Optional[tuple[str, Path]]:
    """``(root inside the hierarchy, mount point)`` of the cgroup2 mount or of the v1 mount
    holding the memory controller."""
    for line in mounts:  # "id parent dev root mountpoint opts [tags] - fstype source superopts"
        fields, _, tail = line.partition(" - ")
        fields_list, tail_list = fields.split(), tail.split()
        if len(fields_list) < 5 or len(tail_list) < 3:
            continue
        fstype, superopts = tail_list[0], tail_list[2].split(",")
        if (version == 2 and fstype == "cgroup2") or (version == 1 and fstype == "cgroup" and "memory" in superopts):
            return fields_list[3], Path(fields_list[4])
    return None


def _group_dirs(root: str, mount_point: Path, group: str) -> list[Path]:
    """The group's directory under ``mount_point`` and each parent up to the mount point (a
    container's mount shows only its own part of the hierarchy: ``root``)."""
    relative = os.path.relpath(group, root) if group.startswith(root) else group.lstrip("/")
    directory = (mount_point / relative).resolve() if relative != "." else mount_point
    if directory != mount_point and mount_point not in directory.parents or not directory.is_dir():
        return [mount_point]  # a namespaced view whose path is not under this mount
    return [directory, *[parent for parent in directory.parents if mount_point in (parent, *parent.parents)]]


def _read_int(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2) is no limit


def _stat_field(path: Path, name: str) -> int:
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


#: Per cgroup version: the limit file, the usage file, and the memory.stat field of the page
#: cache the group can drop (counted in the usage, not a claim on the limit).
_CGROUP_FILES = {
    2: ("memory.max", "memory.current", "inactive_file"),
    1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
}


def _cgroup_headroom(directory: Path, version: int) -> Optional[MemoryHeadroom]:
    limit_file, usage_file, cache_field = _CGROUP_FILES[version]
    limit, used = _read_int(directory / limit_file), _read_int(directory / usage_file)
    if limit is None or used is None or limit >= _V1_UNLIMITED:  # v2 writes "max", v1 ~2^63
        return None
    reclaimable = _stat_field(directory / "memory.stat", cache_field)
    headroom = max(limit - max(used - reclaimable, 0), 0)
    return MemoryHeadroom(headroom, f"the cgroup limit {limit_file} of {gib(limit)} at {directory}")


__all__ = ["MemoryHeadroom", "available_memory", "available_memory_on", "gib", "memory_headrooms"]
