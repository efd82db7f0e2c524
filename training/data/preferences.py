"""Preference pairs for `stage: dpo`, in TRL's conversational preference form.

That is exactly what `guardtune badcases export` writes: {"prompt": [messages ending in a user turn],
"chosen": [{"role": "assistant", ...}], "rejected": [{"role": "assistant", ...}], "meta": {...}}.
Plain strings are accepted for the three fields too. A bad row stops the run with `file:line: reason`,
or is counted with skip_bad_rows.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

from training.data.dataset import file_sha256
from training.data.processor import with_system
from training.data.readers import BadRow, check_alternation, checked_turns, read_all
from training.data.split import eval_count


class BadPair(BadRow):
    pass


@dataclass
class Preferences:
    rows: list[dict]
    bad_rows: list[str] = field(default_factory=list)


@dataclass
class PreferenceSplit:
    train: list[dict]
    eval: list[dict]
    bad_rows: list[str]
    fingerprint: str  # of the data files, recorded in the manifest


def read_preferences(path: str | Path, *, skip_bad_rows: bool = False) -> Preferences:
    return Preferences(*read_all(path, normalise_pair, skip_bad_rows=skip_bad_rows, what="preference rows"))


def normalise_pair(row: object) -> dict:
    """One preference row as {prompt: [messages ending in user], chosen: [assistant], rejected: [assistant]}."""
    if not isinstance(row, dict):
        raise BadPair("row is not a JSON object")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
    if missing:
        raise BadPair(f"preference row needs 'prompt', 'chosen' and 'rejected' (missing {', '.join(missing)})")
    prompt = _prompt(row["prompt"])
    chosen, rejected = _reply(row["chosen"], "chosen"), _reply(row["rejected"], "rejected")
    if chosen[0]["content"].strip() == rejected[0]["content"].strip():
        raise BadPair("chosen equals rejected: nothing to prefer")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _prompt(raw: object) -> list[dict]:
    if isinstance(raw, str) and raw.strip():
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise BadPair("'prompt' must be a non-empty list of messages (or a string)")
    out, turns = checked_turns(raw, "prompt message")
    if not turns or turns[0] != "user" or turns[-1] != "user":
        raise BadPair("'prompt' must start and end with a user turn (after an optional system turn)")
    check_alternation(turns, "prompt has ")
    return out


def _reply(raw: object, key: str) -> list[dict]:
    if isinstance(raw, str):
        raw = [{"role": "assistant", "content": raw}]
    if not isinstance(raw, list) or len(raw) != 1 or not isinstance(raw[0], dict):
        raise BadPair(f"'{key}' must be one assistant message (or a string)")
    m = raw[0]
    if m.get("role") != "assistant":
        raise BadPair(f"'{key}' must be an assistant message, not {m.get('role')!r}")
    if not isinstance(m.get("content"), str) or not m["content"].strip():
        raise BadPair(f"'{key}' has empty or non-string content")
    return [{"role": "assistant", "content": m["content"]}]


def split_preferences(cfg, log) -> PreferenceSplit:
    """Train and eval pairs: the eval_file's, or a seeded `eval_split` of the train_file's."""
    train = read_preferences(cfg.train_file, skip_bad_rows=cfg.skip_bad_rows)
    bad = list(train.bad_rows)
    if cfg.eval_file:
        ev = read_preferences(cfg.eval_file, skip_bad_rows=cfg.skip_bad_rows)
        bad += ev.bad_rows
        train_rows, eval_rows = train.rows, ev.rows
    else:
        order = list(range(len(train.rows)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = eval_count(len(order), cfg.eval_split)
        eval_rows = [train.rows[i] for i in order[:n_eval]]
        train_rows = [train.rows[i] for i in order[n_eval:]]
    if bad:
        log(f"data: skipped {len(bad)} bad rows (skip_bad_rows=true); first: {bad[0]}")
    if cfg.system_prompt is not None:  # as in SFT: the configured system turn where a row has none
        for r in train_rows + eval_rows:
            r["prompt"] = with_system(r["prompt"], cfg.system_prompt)
    files = [cfg.train_file] + ([cfg.eval_file] if cfg.eval_file else [])
    fingerprint = hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()[:16]
    return PreferenceSplit(train_rows, eval_rows, bad, fingerprint)
