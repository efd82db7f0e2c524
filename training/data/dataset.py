"""Build the tokenised train/eval datasets for a config, cached on disk by content.

The cache key covers the data bytes, the tokenizer (vocab and chat template) and every setting that
changes tokens or masks, so a rerun with the same inputs skips tokenisation.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from guardtune.errors import GuardtuneError
from guardtune.paths import cache_root
from training.data.processor import IGNORE, MaskOptions, tokenize_conversation
from training.data.readers import read_jsonl

CACHE_FORMAT = 1


@dataclass
class DataStats:
    train_rows: int
    eval_rows: int
    bad_rows: list[str] = field(default_factory=list)
    untrainable_rows: int = 0  # every label masked after truncation
    truncated_rows: int = 0
    trained_tokens: int = 0
    total_tokens: int = 0


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
    h = hashlib.sha256()
    h.update(str(tokenizer.chat_template).encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()[:16]


def prepare(cfg, tokenizer, *, log=print) -> Prepared:
    files = [cfg.train_file] + ([cfg.eval_file] if cfg.eval_file else [])
    for f in files:
        if not Path(f).is_file():
            raise GuardtuneError(f"data {f}: no such file")
    data_fp = hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()[:16]
    opts = MaskOptions(cfg.max_length, cfg.train_on_prompt, cfg.mask_history, cfg.system_prompt)
    key_src = json.dumps([CACHE_FORMAT, data_fp, tokenizer_fingerprint(tokenizer), asdict(opts),
                          cfg.eval_split, cfg.seed, cfg.skip_bad_rows], sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    cache_dir = cache_root() / "datasets" / key

    from datasets import load_from_disk

    if (cache_dir / "stats.json").is_file():
        stats = DataStats(**json.loads((cache_dir / "stats.json").read_text()))
        ev = cache_dir / "eval"
        log(f"data: tokenised cache hit {cache_dir}")
        return Prepared(load_from_disk(str(cache_dir / "train")), load_from_disk(str(ev)) if ev.exists() else None,
                        stats, data_fp, True)

    train_rows = read_jsonl(cfg.train_file, skip_bad_rows=cfg.skip_bad_rows)
    bad = list(train_rows.bad_rows)
    convs = train_rows.conversations
    if cfg.eval_file:
        eval_rows = read_jsonl(cfg.eval_file, skip_bad_rows=cfg.skip_bad_rows)
        bad += eval_rows.bad_rows
        train_convs, eval_convs = convs, eval_rows.conversations
    else:
        order = list(range(len(convs)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = int(round(len(convs) * cfg.eval_split)) if len(convs) > 1 else 0
        eval_convs = [convs[i] for i in order[:n_eval]]
        train_convs = [convs[i] for i in order[n_eval:]]
    if bad:
        log(f"data: skipped {len(bad)} bad rows (skip_bad_rows=true); first: {bad[0]}")

    stats = DataStats(train_rows=0, eval_rows=0, bad_rows=bad)
    train = _tokenise(train_convs, tokenizer, opts, stats, log=log, label="train")
    stats.train_rows = len(train["input_ids"])
    evald = _tokenise(eval_convs, tokenizer, opts, stats, log=log, label="eval") if eval_convs else None
    stats.eval_rows = len(evald["input_ids"]) if evald else 0
    if stats.train_rows == 0 or stats.trained_tokens == 0:
        raise GuardtuneError(
            f"data {cfg.train_file}: every label is masked (no assistant tokens survive max_length={cfg.max_length}); "
            "nothing to train on"
        )

    from datasets import Dataset

    tmp = cache_dir.with_name(cache_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    train_ds = Dataset.from_dict(train)
    train_ds.save_to_disk(str(tmp / "train"))
    eval_ds = Dataset.from_dict(evald) if evald else None
    if eval_ds is not None:
        eval_ds.save_to_disk(str(tmp / "eval"))
    (tmp / "stats.json").write_text(json.dumps(asdict(stats)))
    shutil.rmtree(cache_dir, ignore_errors=True)
    tmp.rename(cache_dir)
    return Prepared(load_from_disk(str(cache_dir / "train")),
                    load_from_disk(str(cache_dir / "eval")) if eval_ds is not None else None, stats, data_fp, False)


def _tokenise(convs, tokenizer, opts: MaskOptions, stats: DataStats, *, log, label: str) -> dict:
    out = {"input_ids": [], "labels": []}
    step = max(1, len(convs) // 5)
    for i, conv in enumerate(convs, start=1):
        ex = tokenize_conversation(tokenizer, conv, opts)
        if ex is None:
            stats.untrainable_rows += 1
            continue
        stats.truncated_rows += int(ex.dropped_turns > 0 or len(ex.input_ids) == opts.max_length)
        stats.trained_tokens += sum(1 for lab in ex.labels if lab != IGNORE)
        stats.total_tokens += len(ex.input_ids)
        out["input_ids"].append(ex.input_ids)
        out["labels"].append(ex.labels)
        if i % step == 0 or i == len(convs):
            log(f"data: tokenised {label} {i}/{len(convs)}")
    return out
