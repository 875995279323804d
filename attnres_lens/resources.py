"""How much memory a run can have, so that one that cannot fit is refused before it starts."""

from __future__ import annotations

import os
from typing import Optional, Union


def available_memory_bytes() -> Optional[int]:
    """Memory available to new allocations on this machine (Linux ``MemAvailable``; elsewhere the
    free physical pages), or ``None`` when the platform does not say."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gib(n_bytes: Union[int, float]) -> str:
    """``n_bytes`` as ``"12.3 GiB"``."""
    return f"{n_bytes / 2**30:.1f} GiB"
