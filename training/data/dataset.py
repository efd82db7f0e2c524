"""Build the tokenised train/eval datasets for a config, cached on disk by content.

The cache key covers the data bytes, the tokenizer (as it serialises, and its chat template) and every setting that
changes tokens or masks, so a rerun with the same inputs skips tokenisation.

Rows stream from the file through cleaning (cleaning.py) and the train/eval split into shards that
are tokenised (by worker processes, workers.py) and cached one at a time (shards.py), so a dataset of
any size fits in memory:
- stage sft: conversations with label masks (processor.py), optionally packed (packing.py);
- stage pt: raw text cut into full blocks, every token trained (pretrain.py).
"""

from __future__ import annotations

import gc
import hashlib
import json
import random
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from kernel.errors import GuardtuneError
from kernel.paths import cache_root
from training.data import shards
from training.data.cleaning import Cleaner, CleaningCounts
from training.data.mixing import MixPlan, describe
from training.data.pretrain import text_blocks
from training.data.processor import MaskOptions
from training.data.readers import count_rows, iter_rows, normalise_row, text_row
from training.data.sft_shard import SftShard
from training.data.split import eval_count
from training.data.workers import ShardPool, cores

CACHE_FORMAT = 2


@dataclass
class DataStats:
    train_rows: int  # conversations (pt: documents) kept
    eval_rows: int
    bad_rows: list[str] = field(default_factory=list)
    untrainable_rows: int = 0  # every label masked after truncation
    truncated_rows: int = 0
    trained_tokens: int = 0
    total_tokens: int = 0
    data_mix: list[dict] | None = None  # realised mix of `datasets:` sources (mixing.py)
    train_sequences: int = 0  # rows the trainer sees: conversations, packed rows or pt blocks
    eval_sequences: int = 0
    dropped_tokens: int = 0  # pt: tails shorter than a block
    cleaning: dict = field(default_factory=lambda: asdict(CleaningCounts()))
    shards: dict = field(default_factory=dict)  # split -> shard names in the cache


@dataclass
class Prepared:
    train: "object"  # datasets.Dataset
    eval: "object | None"
    stats: DataStats
    fingerprint: str  # of the data files alone, recorded in the manifest
    cache_hit: bool


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """The chat template and the whole fast tokenizer (vocabulary, merges, normaliser, added tokens) as
    it serialises; a slow tokenizer by its vocabulary."""
    h = hashlib.sha256()
    h.update(str(tokenizer.chat_template).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else
             json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()[:16]


def prepare(cfg, tokenizer, *, replays: dict[int, Path] | None = None, log=print) -> Prepared:
    """`replays`: the generated file of each replay source in `datasets:`, by its index."""
    mix = MixPlan.build(cfg, replays or {}) if getattr(cfg, "datasets", None) else None
    files = (mix.files if mix else [cfg.train_file]) + ([cfg.eval_file] if cfg.eval_file else [])
    for f in files:
        if not Path(f).is_file():
            raise GuardtuneError(f"data {f}: no such file")
    data_fp = hashlib.sha256(("".join(file_sha256(f) for f in files) + (mix.key() if mix else "")).encode()).hexdigest()[:16]
    opts = MaskOptions(cfg.max_length, cfg.train_on_prompt, cfg.mask_history, cfg.system_prompt)
    data_opts = {k: getattr(cfg, k) for k in ("stage", "block_size", "packing", "dedup_exact", "dedup_near",
                                              "filler_words", "banned_phrases", "shard_rows")}
    key_src = json.dumps([CACHE_FORMAT, data_fp, tokenizer_fingerprint(tokenizer), asdict(opts),
                          cfg.eval_split, cfg.seed, cfg.skip_bad_rows, data_opts], sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    cache_dir = cache_root() / "datasets" / key

    if shards.is_complete(cache_dir):
        stats = DataStats(**json.loads((cache_dir / "stats.json").read_text()))
        log(f"data: tokenised cache hit {cache_dir}")
        if stats.data_mix:
            log(describe(stats.data_mix))
        return Prepared(shards.load(cache_dir, stats.shards["train"]), shards.load(cache_dir, stats.shards["eval"]),
                        stats, data_fp, True)

    bad: list[str] = []
    cleaning = CleaningCounts()
    meta: dict = {}
    stream = _rows(cfg, mix, bad, cleaning, meta, log)
    with ShardPool(tokenizer, opts, cores() // shards.local_rank()[1]) as pool, _heap_frozen():
        open_shard = partial(_pt_shard, tokenizer, cfg.block_size or cfg.max_length) if cfg.stage == "pt" \
            else partial(SftShard, tokenizer, opts, cfg.packing, pool)
        names, totals = shards.build(cache_dir, stream, open_shard, shard_rows=cfg.shard_rows, log=log)
    if bad:
        log(f"data: skipped {len(bad)} bad rows (skip_bad_rows=true); first: {bad[0]}")
    if any(asdict(cleaning).values()):
        log(f"data: cleaning: {cleaning.summary()}")

    stats = DataStats(train_rows=totals.get("rows", 0), eval_rows=totals.get("eval_rows", 0), bad_rows=bad,
                      data_mix=meta.get("data_mix"), cleaning=asdict(cleaning), shards=names,
                      train_sequences=totals.get("sequences", 0), eval_sequences=totals.get("eval_sequences", 0))
    for k in ("untrainable_rows", "truncated_rows", "trained_tokens", "total_tokens", "dropped_tokens"):
        setattr(stats, k, totals.get(k, 0) + totals.get(f"eval_{k}", 0))
    if stats.train_rows + stats.untrainable_rows == 0:
        after = " left after cleaning" if meta.get("seen") else ""
        raise GuardtuneError(f"data {cfg.train_file}: no usable rows{after}")
    if stats.train_sequences == 0 and cfg.stage == "pt":
        raise GuardtuneError(f"data {cfg.train_file}: {stats.dropped_tokens} tokens of text, fewer than one "
                             f"block of {cfg.block_size or cfg.max_length}; lower block_size or add text")
    if stats.train_rows == 0 or totals.get("trained_tokens", 0) == 0:
        raise GuardtuneError(
            f"data {cfg.train_file}: every label is masked (no assistant tokens survive max_length={cfg.max_length}); "
            "nothing to train on"
        )
    shards.finish(cache_dir, asdict(stats))
    return Prepared(shards.load(cache_dir, names["train"]), shards.load(cache_dir, names["eval"]), stats, data_fp,
                    False)


def _rows(cfg, mix, bad: list[str], cleaning: CleaningCounts, meta: dict, log):
    """Stream ("train" | "eval", cleaned row). Without an eval_file, `eval_split` of the row indices,
    drawn with the seed, go to eval; duplicates are judged across both, so none straddle the split."""
    parse = text_row if cfg.stage == "pt" else normalise_row
    cleaner = Cleaner.from_config(cfg)
    if mix is not None:
        train, evals, mix_bad, meta["data_mix"] = mix.sample(eval_split=0.0 if cfg.eval_file else cfg.eval_split,
                                                            skip_bad_rows=cfg.skip_bad_rows, log=log)
        bad += mix_bad
        labelled = [("train", r) for r in train] + [("eval", r) for r in evals]
    else:
        eval_idx: set[int] = set()
        if not cfg.eval_file and cfg.eval_split > 0:
            n = count_rows(cfg.train_file)
            eval_idx = set(random.Random(cfg.seed).sample(range(n), eval_count(n, cfg.eval_split)))
        labelled = (("eval" if i in eval_idx else "train", r)
                    for i, r in iter_rows(cfg.train_file, parse, skip_bad_rows=cfg.skip_bad_rows, bad_rows=bad))
    for split, row in labelled:
        meta["seen"] = True
        row = cleaner(row)
        if row is not None:
            yield split, row
    cleaning.add(cleaner.counts)
    if cfg.eval_file:
        eval_cleaner = Cleaner.from_config(cfg)  # a given eval set is judged on its own
        for _, row in iter_rows(cfg.eval_file, parse, skip_bad_rows=cfg.skip_bad_rows, bad_rows=bad):
            row = eval_cleaner(row)
            if row is not None:
                yield "eval", row
        cleaning.add(eval_cleaner.counts)


@contextmanager
def _heap_frozen():
    """Keep the collector off the heap that was there before (torch, transformers: half a million
    objects): its passes over that while rows pile up in a shard cost 72 -> 64 us a row in-process."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _pt_shard(tokenizer, block_size: int) -> shards.ListShard:
    def tokenise(docs: list) -> shards.Tokenised:
        blocks, dropped = text_blocks(tokenizer, docs, block_size)
        n_tokens = int(sum(len(b) for b in blocks))
        return {"input_ids": blocks, "labels": blocks}, {
            "rows": len(docs), "sequences": len(blocks), "trained_tokens": n_tokens, "total_tokens": n_tokens,
            "dropped_tokens": dropped}

    return shards.ListShard(tokenise)
