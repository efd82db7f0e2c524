"""Worker processes that tokenise SFT shards while the main process reads the next one.

Tokenising is Python-bound (rendering the chat template, the piecewise fast path), so threads would
share one core; processes use them all. The pool starts with the first batch sent to it (sft_shard.py
sends none for a shard of one batch), one worker per core, and it is forked: the workers share the loaded
tokenizer and the fast path learned before the fork, and start in milliseconds. Each worker runs its
tokenizer single-threaded (the cores are the pool's). Results come back as four flat arrays per
batch (`Flat`), cheap to pickle; the main process packs and writes them in order, so the shards are
the same bytes as without workers. Where processes cannot fork (Windows), everything stays in-process.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
from array import array

import numpy as np

from training.data.processor import MaskOptions, piecewise_for, tokenize_batch

Flat = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # ids, labels (rows end to end), lengths, truncated
_STATE: tuple = ()  # (tokenizer, MaskOptions) in a worker


def flat_batch(examples: list) -> Flat:
    """A batch's examples as four arrays. Length -1: untrainable (None)."""
    kept = [ex for ex in examples if ex is not None]
    lengths = np.array([-1 if ex is None else len(ex.input_ids) for ex in examples], dtype=np.int64)
    ids, labels = array("i"), array("i")  # C int, int32: fromlist is twice as fast as np.array on lists
    for ex in kept:
        ids.fromlist(ex.input_ids)
        labels.fromlist(ex.labels)
    truncated = np.array([ex.dropped_turns > 0 for ex in kept], dtype=bool)
    return (np.frombuffer(ids, dtype=np.intc).astype(np.int32, copy=False),
            np.frombuffer(labels, dtype=np.intc).astype(np.int32, copy=False), lengths, truncated)


def cores() -> int:
    """CPUs this process may run on (its affinity, which container limits often set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ShardPool:
    def __init__(self, tokenizer, opts: MaskOptions, processes: int):
        self.tokenizer, self.opts = tokenizer, opts
        self.processes = processes if "fork" in multiprocessing.get_all_start_methods() else 0
        self._pool = None

    @property
    def parallel(self) -> bool:
        """False: tokenise in-process (one core, or no fork)."""
        return self.processes >= 2

    def submit(self, batch: list):
        """An AsyncResult of the batch's Flat; the pool forks on the first call."""
        if self._pool is None:
            self._pool = self._start()
        return self._pool.apply_async(_tokenise, (batch,))

    def _start(self):
        piecewise_for(self.tokenizer)  # learned once, here: the workers inherit it
        ctx = multiprocessing.get_context("fork")
        before = os.environ.get("TOKENIZERS_PARALLELISM")
        # Set across the fork: workers see it configured, so tokenizers neither warns nor starts threads there.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            return ctx.Pool(self.processes, initializer=_init, initargs=(self.tokenizer, self.opts))
        finally:
            if before is None:
                del os.environ["TOKENIZERS_PARALLELISM"]
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = before

    def __enter__(self) -> "ShardPool":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if self._pool is not None:
            if exc_type is None:
                self._pool.close()
            else:
                self._pool.terminate()
            self._pool.join()
            self._pool = None


def _init(tokenizer, opts: MaskOptions) -> None:
    global _STATE
    _STATE = (tokenizer, opts)
    gc.freeze()  # the inherited heap is never collected here: no passes over it, no copy-on-write of its pages


def _tokenise(convs: list) -> Flat:
    return flat_batch(tokenize_batch(_STATE[0], convs, _STATE[1]))
