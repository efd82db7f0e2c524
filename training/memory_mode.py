"""`host_memory: auto`: fast unless memory is really tight.

It takes `guardtune estimate`'s peak for the config, allows `fast` its worst measured excess over
it, and picks `bounded` only when that would come within 20% of the memory this machine (or its
cgroup) has available. Running out of memory loses the run; being slower does not, but paying 1.4x
on every step of a run that fits anyway buys nothing. Kept apart from host_memory.py, which a
process must be able to import before anything else has touched the heap.
"""

from __future__ import annotations

import os

from kernel.errors import GuardtuneError
from kernel.host import available_bytes
from training.config import TrainConfig
from training.estimate import estimate
from training.estimate.memory import GiB
from training.estimate.options import estimate_config

FAST_PEAK_FACTOR = 1.25  # fast's peak RSS over bounded's, at most 1.24x on 9 configurations
HEADROOM = 0.8  # auto keeps the fast peak under this share of the available memory
def choose(predicted: int | None, available: int | None, processes: int = 1) -> tuple[str, str]:
    """auto's pick for `processes` training processes of `predicted` bytes each: (mode, why)."""
    if predicted is None or available is None:
        return "bounded", "auto: no estimate of the peak, so the predictable mode"
    fast_peak = FAST_PEAK_FACTOR * predicted * processes
    sizes = (f"estimated peak {processes * predicted / GiB:.1f} GiB, up to {fast_peak / GiB:.1f} GiB fast; "
             f"{available / GiB:.1f} GiB available")
    if fast_peak > HEADROOM * available:
        return "bounded", f"auto: {sizes}; fast would come too close"
    return "fast", f"auto: {sizes}"


def predicted_peak(cfg: TrainConfig, device: str = "cpu") -> int | None:
    """The estimate of one training process's peak, or None when the model's shape is unknown."""
    try:
        return estimate(estimate_config(cfg.model_dump(mode="json", exclude_none=True), "train", device=device)).total
    except (GuardtuneError, ValueError, OSError, KeyError):  # an unknown shape: auto falls back to bounded
        return None


def resolve(cfg: TrainConfig, *, on_cpu: bool) -> tuple[str, str | None]:
    """The mode to run and, for auto on CPU, why it was chosen."""
    if cfg.host_memory != "auto":
        return cfg.host_memory, None
    if not on_cpu:
        return "fast", None  # the host allocator is not where a GPU run's activations live
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return choose(predicted_peak(cfg), available_bytes(), processes)
