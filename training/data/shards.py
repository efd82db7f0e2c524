"""Streamed, sharded tokenisation into a content-keyed on-disk cache of memory-mapped Arrow shards.

Rows arrive as a stream of (split, row). Every `shard_rows` rows of a split become one shard, which
is tokenised and written as an Arrow file, then renamed into place, so a killed run keeps its
finished shards and the rerun tokenises only the rest. Memory therefore follows the shard size:
the stream is never held whole, and the finished shards are memory-mapped, not loaded. A shard may
be tokenised elsewhere (worker processes) while its rows are still being read; at most two are in
flight.

When several processes prepare the same data (torchrun sets LOCAL_RANK/LOCAL_WORLD_SIZE), each
tokenises every n-th shard and waits for the others' shards on disk; every process then maps all
shards, and the Trainer's sampler shuffles rows across all of them, anew each epoch.
`stats.json`, written last by local rank 0, marks the cache complete.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import numpy as np

from kernel.errors import GuardtuneError
from kernel.fsutil import atomic_write_text

SPLITS = ("train", "eval")
Columns = dict[str, list[np.ndarray]]
Tokenised = tuple[Columns, dict[str, int]]


class Shard(Protocol):
    """One shard's rows as they arrive. It may start tokenising before it is full (worker processes);
    done() returns its columns and counts, or a callable that waits for them."""

    def add(self, row) -> None: ...

    def done(self) -> "Tokenised | Callable[[], Tokenised]": ...


class ListShard:
    """A shard that keeps its rows and tokenises them all at done()."""

    def __init__(self, tokenise: Callable[[list], Tokenised]):
        self.rows: list = []
        self.add = self.rows.append
        self._tokenise = tokenise

    def done(self) -> Tokenised:
        return self._tokenise(self.rows)


@dataclass
class _Filling:
    name: str
    shard: Shard | None  # None: another rank writes it, or an earlier run already did
    rows: int = 0
    start: float = field(default_factory=time.time)


def local_rank() -> tuple[int, int]:
    """(rank, world) of the processes on this node; each node fills its own cache, shared or not."""
    env = os.environ
    if "LOCAL_RANK" in env:
        return int(env["LOCAL_RANK"]), int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", "1")))
    return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))


def is_complete(cache_dir: Path) -> bool:
    return (cache_dir / "stats.json").is_file()


def build(cache_dir: Path, rows: Iterable[tuple[str, object]], open_shard: Callable[[], Shard], *,
          shard_rows: int, log=print, wait_timeout_s: float = 6 * 3600,
          ranks: tuple[int, int] | None = None) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Tokenise the stream into shards under cache_dir; returns (shard names per split, summed counts).

    Each shard this process writes gets a fresh `open_shard()` and its rows one by one. A shard whose
    done() returns a callable is being tokenised elsewhere; it is written once the next shard has been
    read, so reading overlaps tokenising and at most two shards are in flight.
    `ranks` (rank, world) defaults to the launcher's environment (local_rank())."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    rank, world = ranks or local_rank()
    names: dict[str, list[str]] = {s: [] for s in SPLITS}
    filling: dict[str, _Filling] = {}  # the shard of each split that rows go to now
    done = {"tokenised": 0, "reused": 0}
    pending: list[tuple[str, int, float, object]] = []  # (name, rows, start, result or its callable)

    def write(name: str, n: int, t0: float, result) -> None:
        columns, counts = result() if callable(result) else result
        _write_shard(cache_dir, name, columns, counts)
        done["tokenised"] += 1
        dt = time.time() - t0
        log(f"data: tokenised {name}: {n} rows in {dt:.1f}s ({n / max(dt, 1e-9):,.0f} rows/s)")

    def open_(split: str) -> _Filling:
        name = f"{split}-{len(names[split]):05d}"
        mine = sum(len(v) for v in names.values()) % world == rank
        names[split].append(name)
        reused = mine and (cache_dir / f"{name}.json").is_file()
        done["reused"] += reused
        return _Filling(name, open_shard() if mine and not reused else None)

    def close(split: str) -> None:
        f = filling.pop(split)
        if f.shard is not None:
            pending.append((f.name, f.rows, f.start, f.shard.done()))
            while pending and (len(pending) > 1 or not callable(pending[0][3])):
                write(*pending.pop(0))

    for split, row in rows:
        f = filling.get(split) or filling.setdefault(split, open_(split))
        f.rows += 1
        if f.shard is not None:
            f.shard.add(row)
        if f.rows >= shard_rows:
            close(split)
    for split in SPLITS:
        if split in filling:
            close(split)
    while pending:
        write(*pending.pop(0))
    if done["reused"]:
        log(f"data: reused {done['reused']} shards cached by an earlier, unfinished run")
    all_names = [n for s in SPLITS for n in names[s]]
    _wait_for(cache_dir, all_names, log, wait_timeout_s)
    totals: dict[str, int] = {}
    for n in all_names:
        for k, v in json.loads((cache_dir / f"{n}.json").read_text()).items():
            key = f"eval_{k}" if n.startswith("eval") else k
            totals[key] = totals.get(key, 0) + v
    return names, totals


def finish(cache_dir: Path, stats: dict, ranks: tuple[int, int] | None = None) -> None:
    """Local rank 0 marks the cache complete; the others wait for the mark."""
    rank, _ = ranks or local_rank()
    if rank == 0:
        atomic_write_text(cache_dir / "stats.json", json.dumps(stats))
    else:
        _wait_for(cache_dir, [], print, 3600, marker="stats.json")


def load(cache_dir: Path, names: list[str]):
    """The shards of one split as one memory-mapped dataset, or None when there are none."""
    from datasets import Dataset, concatenate_datasets

    if not names:
        return None
    parts = [Dataset.from_file(str(cache_dir / f"{n}.arrow")) for n in names]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _write_shard(cache_dir: Path, name: str, columns: Columns, counts: dict[str, int]) -> None:
    import pyarrow as pa

    table = pa.table({k: _list_array(v) for k, v in columns.items()})
    tmp = cache_dir / f"{name}.arrow.tmp-{os.getpid()}"
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    tmp.rename(cache_dir / f"{name}.arrow")
    atomic_write_text(cache_dir / f"{name}.json", json.dumps(counts))  # written last: the shard is complete


def _list_array(arrays: list[np.ndarray]):
    import pyarrow as pa

    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays).astype(np.int32, copy=False) if arrays else np.zeros(0, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _wait_for(cache_dir: Path, names: list[str], log, timeout_s: float, marker: str | None = None) -> None:
    files = [cache_dir / f"{n}.json" for n in names] + ([cache_dir / marker] if marker else [])
    t0 = last = time.time()
    while True:
        missing = [f for f in files if not f.is_file()]
        if not missing:
            return
        now = time.time()
        if now - t0 > timeout_s:
            raise GuardtuneError(f"data: gave up after {timeout_s:.0f}s waiting for {missing[0]} "
                                 "from another rank; did it fail?")
        if now - last > 60:
            log(f"data: waiting for {len(missing)} shards from other ranks")
            last = now
        time.sleep(0.5)
