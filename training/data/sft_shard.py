"""One SFT shard: conversations in, label-masked (optionally packed) columns and counts out.

Rows go out in batches of BATCH as they arrive. With a worker pool each full batch is sent at once,
so the workers tokenise while the main process is still reading the shard's rows; the pool starts
with a shard's second batch, so a few rows never pay for the fork. The batches come back in order,
and the shard is the same bytes with or without workers.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from training.data.packing import pack
from training.data.processor import IGNORE, Example, MaskOptions, tokenize_batch
from training.data.shards import Tokenised
from training.data.workers import Flat, ShardPool, flat_batch

BATCH = 1000  # rows per tokenize_batch call: one render call, one task for a worker process


class SftShard:
    def __init__(self, tokenizer, opts: MaskOptions, packing: bool, pool: ShardPool | None = None):
        self.tokenizer, self.opts, self.packing, self.pool = tokenizer, opts, packing, pool
        self.batch: list = []
        self.held: list[list] = []  # batches not sent: no pool, or the first one, until a second comes
        self.jobs: list = []  # the workers' results, in order

    def add(self, row) -> None:
        self.batch.append(row)
        if len(self.batch) >= BATCH:
            self._send(self.batch)
            self.batch = []

    def done(self) -> "Tokenised | Callable[[], Tokenised]":
        if self.batch:
            self._send(self.batch)
            self.batch = []
        if not self.jobs:
            return sft_columns([flat_batch(tokenize_batch(self.tokenizer, b, self.opts)) for b in self.held],
                               self.opts, self.packing)
        jobs = self.jobs  # taken in order as they finish: each is unpacked while the next is still running
        return lambda: sft_columns((j.get() for j in jobs), self.opts, self.packing)

    def _send(self, batch: list) -> None:
        parallel = self.pool is not None and self.pool.parallel
        if not parallel or not (self.jobs or self.held):
            self.held.append(batch)
            return
        self.jobs += [self.pool.submit(b) for b in self.held + [batch]]
        self.held = []


def sft_columns(flats: Iterable[Flat], opts: MaskOptions, packing: bool) -> Tokenised:
    counts = dict.fromkeys(("rows", "sequences", "untrainable_rows", "truncated_rows", "trained_tokens",
                            "total_tokens"), 0)
    examples = []
    for ids, labels, lengths, truncated in flats:
        n = lengths[lengths >= 0]
        counts["untrainable_rows"] += len(lengths) - len(n)
        counts["truncated_rows"] += int((truncated | (n == opts.max_length)).sum())
        counts["trained_tokens"] += int((labels != IGNORE).sum())
        counts["total_tokens"] += len(ids)
        ends = np.cumsum(n).tolist()
        examples += [Example(ids[a:b], labels[a:b]) for a, b in zip([0] + ends, ends)]
    counts["rows"] = len(examples)
    if packing:
        columns = pack(examples, opts.max_length)
    else:
        columns = {"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]}
    counts["sequences"] = len(columns["input_ids"])
    return columns, counts
