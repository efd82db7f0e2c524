"""What memory this machine (or the container's cgroup) has: for choosing a training mode and admitting jobs."""

from __future__ import annotations

from pathlib import Path


def available_bytes() -> int | None:
    """MemAvailable, or less when this process's cgroup (a container's limit) leaves less; None off Linux."""
    avail = _meminfo("MemAvailable")
    limit = _cgroup_limit()
    if avail is not None and limit is not None:
        try:
            avail = min(avail, limit - int(Path("/sys/fs/cgroup/memory.current").read_text()))
        except (OSError, ValueError):
            pass
    return avail


def total_bytes() -> int | None:
    """MemTotal, capped by the cgroup's limit; None off Linux."""
    total, limit = _meminfo("MemTotal"), _cgroup_limit()
    return total if total is None or limit is None else min(total, limit)


def _meminfo(field: str) -> int | None:
    try:
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith(field + ":"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return None


def _cgroup_limit() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        return None if limit == "max" else int(limit)
    except (OSError, ValueError):
        return None
