"""How a CPU training process gets and gives back host memory.

glibc serves small allocations from its heap and mmaps large ones, but its mmap threshold is
dynamic: each freed mmapped block raises it, up to 32 MiB. After the first freed activation, every
tensor below that size comes from the heap, and the heap keeps freed blocks it cannot reuse. On
SmolLM2 LoRA, peak RSS was 1.2-1.8x the live tensors. Two settings deal with it:
- torch's transparent-huge-page allocation (THP_MEM_ALLOC_ENABLE), always on: tensors of 2 MiB and
  more are 2 MiB-aligned and backed by huge pages. Same speed here, and 31% less peak RSS (LoRA
  4 x 384 with gradient checkpointing).
- `host_memory: bounded` pins the mmap threshold at 1 MiB, so tensors from that size go back to
  the OS when freed, and peak RSS tracks the live tensors that `guardtune estimate` counts (the
  estimate was -5.5% to +11.1% off on 9 configurations). The kernel zeroes every fresh page, so
  steps took 1.38-1.51x as long.
- `host_memory: fast` keeps glibc's dynamic threshold: quicker, at 1.07-1.24x the peak RSS
  (bench/results/estimate.md).
- `host_memory: auto`, the default, picks one of the two from the estimate (memory_mode.py).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
# 2 MiB (where torch's huge-page alignment starts) left SmolLM2's 1.2 MiB hidden states at batch 4 x 128
# in the heap, 17% over the estimate. At 1 MiB a 7B model's fp32 hidden state qualifies from 64 tokens.
BOUNDED_MMAP_THRESHOLD = 2**20


def prepare_process_env() -> None:
    """Before torch is imported (torch reads THP_MEM_ALLOC_ENABLE once, at its first allocation).
    Child ranks inherit it. Skipped where the kernel has no transparent huge pages."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    try:
        usable = "[never]" not in thp.read_text()
    except OSError:
        usable = False
    if usable:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def configure(mode: str, *, on_cpu: bool) -> str | None:
    """Pin glibc's mmap threshold for `bounded` CPU training. A MALLOC_MMAP_THRESHOLD_ the user set
    wins. Returns what was done, for the log, or None when nothing was."""
    if mode != "bounded" or not on_cpu or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, BOUNDED_MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc (musl, macOS): its allocator is left as it is
        return None
    return f"host memory: bounded (glibc mmap threshold {BOUNDED_MMAP_THRESHOLD >> 20} MiB)" if ok else None

