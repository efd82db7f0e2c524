"""Whether a queued job may start now: its estimated peak must fit in what is free.

It applies to the local executor (a cluster's scheduler places its own jobs). Free is the host's available memory (MemAvailable, or the cgroup's limit less its usage, whichever
is less) less what the running jobs are predicted to need beyond what they already use. A job whose
peak the estimator cannot predict starts only when nothing else runs.
"""

from __future__ import annotations

from jobs.model import Job
from kernel.host import available_bytes, total_bytes

GIB = 1 << 30
HEADROOM = 1.1  # on the estimate, which is within about 10% of measured peaks (docs/training.md)


def never_fits(job: Job, headroom: float = HEADROOM, total: int | None = None) -> str | None:
    """Why a job can never start here (its estimate exceeds all the memory there is), or None."""
    total = total_bytes() if total is None else total
    if job.estimate_bytes is None or total is None or job.estimate_bytes * headroom <= total:
        return None
    return (f"needs {job.estimate_bytes * headroom / GIB:.1f} GiB (estimate x{headroom}), more than the "
            f"{total / GIB:.1f} GiB this machine has; lower batch_size or max_length, or use qlora")


def reason_to_wait(job: Job, running: list[Job], *, max_running: int, headroom: float = HEADROOM,
                   available: int | None = None, memory: bool = True) -> str | None:
    """None: start it. Else why it waits, in words for the page. `memory=False`: the executor's own
    scheduler places the job (a cluster), so only the count of running jobs limits it."""
    if len(running) >= max_running:
        return f"{len(running)} job(s) running, the limit is {max_running}"
    if not memory:
        return None
    if job.estimate_bytes is None:
        return "no memory estimate for this model; waiting for the running jobs to finish" if running else None
    free = available_bytes() if available is None else available
    if free is None:
        return None
    # Running jobs not yet at their peak will still take the rest of it.
    reserved = sum(max((j.estimate_bytes or 0) - (j.peak_rss_bytes or 0), 0) for j in running)
    need = int(job.estimate_bytes * headroom)
    if need > free - reserved:
        return (f"needs {need / GIB:.1f} GiB (estimate x{headroom}); {max(free - reserved, 0) / GIB:.1f} GiB free"
                + (f" after {reserved / GIB:.1f} GiB held for running jobs" if reserved else ""))
    return None
