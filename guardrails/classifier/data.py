"""The classifier's data: hand-written seed rows, split by seed, then augmented within each split.

Seeds live in `seeds/*.jsonl` ({"text", "labels", "lang", "form"}). A seed's split comes from a
hash of its text, so it never changes when rows are added or reordered, and every variant made from
a seed (obfuscated, wrapped in a long text, turned into a conversation) stays in its seed's split:
no variant of a test seed is ever trained on or used to choose a threshold.

The benign rows of `benign_*` and `traffic_*` files are ordinary customer-service and assistant
traffic, hard negatives included: the false-positive budget is set and measured on them. Benign rows
in the other files are twins of their attacks, written to look like them; they are trained on, and
their flagged share is reported apart.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from guardrails.classifier.categories import LANGS, closed
from kernel.errors import GuardtuneError

SEEDS = Path(__file__).resolve().parent / "seeds"
FORMS = ("direct", "indirect", "polite", "obfuscated", "multi_turn", "short", "long")
# Shares of the seeds: train fits the head, calib sets the thresholds, test only measures.
SPLITS = (("train", 0.65), ("calib", 0.15), ("test", 0.20))
TRAFFIC_FILES = ("benign_", "traffic_")


@dataclass(frozen=True)
class Row:
    text: str
    labels: tuple[str, ...]  # closed under parents; () is benign
    lang: str
    form: str
    seed: str  # the seed's id; variants share it
    split: str
    variant: str = "seed"  # how it was made from the seed
    traffic: bool = False  # benign, from a traffic file (the negatives of the false-positive budget)
    source: str = ""  # the seed file's stem, for reports by kind of row


@dataclass
class Dataset:
    rows: list[Row] = field(default_factory=list)

    def split(self, name: str) -> list[Row]:
        return [r for r in self.rows if r.split == name]


def split_of(seed_id: str) -> str:
    x = int(seed_id[:8], 16) / 0xFFFFFFFF
    edge = 0.0
    for name, share in SPLITS:
        edge += share
        if x < edge:
            return name
    return SPLITS[-1][0]


def _row(obj: dict, where: str, traffic_file: bool, source: str = "") -> Row:
    try:
        text, lang, form = obj["text"], obj["lang"], obj.get("form", "direct")
        labels = tuple(closed(obj.get("labels", [])))
    except (KeyError, TypeError, ValueError) as e:
        raise GuardtuneError(f"{where}: {e}") from None
    if not isinstance(text, str) or not text.strip() or lang not in LANGS or form not in FORMS:
        raise GuardtuneError(f"{where}: needs a non-empty text, lang in {LANGS} and form in {FORMS}")
    seed = hashlib.sha256(text.strip().lower().encode()).hexdigest()
    return Row(text, labels, lang, form, seed, split_of(seed), traffic=traffic_file and not labels, source=source)


def load_seeds(root: Path = SEEDS) -> list[Row]:
    """Every seed row, duplicates (same text, any case) dropped; errors name the file and line."""
    files = sorted(root.glob("*.jsonl"))
    if not files:
        raise GuardtuneError(f"no seed files (*.jsonl) in {root}")
    rows, seen = [], set()
    for path in files:
        for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):  # not splitlines: U+2028 is text
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise GuardtuneError(f"{path.name}:{n}: not JSON ({e.msg})") from None
            row = _row(obj, f"{path.name}:{n}", path.name.startswith(TRAFFIC_FILES), path.stem)
            if row.seed not in seen:
                seen.add(row.seed)
                rows.append(row)
    return rows


def sample(rows: list[Row], per_group: int) -> list[Row]:
    """At most `per_group` seeds of each (split, lang, first label, traffic or not), in seed-id order: a
    small slice that still has every split, language, category and kind of benign row (a quick retrain)."""
    groups: dict[tuple, list[Row]] = {}
    for r in sorted(rows, key=lambda r: r.seed):
        groups.setdefault((r.split, r.lang, r.labels[:1], r.traffic), []).append(r)
    return [r for g in groups.values() for r in g[:per_group]]


def digest(rows: list[Row]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r.text, r.labels, r.lang, r.form, r.split, r.variant, r.traffic]).encode())
    return h.hexdigest()[:16]
