"""Data cleaning before tokenisation: filler words, banned phrases, exact and near duplicates.

Each option counts the rows it touched, so a run reports what cleaning did to the data instead of
silently shrinking it. Rows are conversations (lists of messages) or, for stage pt, text strings.
Order: fillers are stripped first, so duplicates are judged on the cleaned text.

Duplicate detection keeps state for every kept row (an 8-byte hash for exact, a 32 x 4-byte MinHash
signature plus band buckets for near), so unlike tokenisation its memory grows with the dataset.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from dataclasses import dataclass, field

import numpy as np

SHINGLE = 5  # characters; works for scripts without spaces (Chinese) as well as for English
PERMS, BANDS = 32, 8  # 8 bands of 4 rows: pairs above ~0.6 Jaccard nearly always share a band


@dataclass
class CleaningCounts:
    filler_rows: int = 0  # rows with at least one filler stripped
    filler_emptied_rows: int = 0  # dropped: a turn held nothing but fillers
    banned_rows: int = 0
    exact_dup_rows: int = 0
    near_dup_rows: int = 0

    def add(self, other: "CleaningCounts") -> None:
        for k, v in vars(other).items():
            setattr(self, k, getattr(self, k) + v)

    def summary(self) -> str:
        return (f"fillers stripped in {self.filler_rows} rows ({self.filler_emptied_rows} emptied and dropped), "
                f"{self.banned_rows} dropped for banned phrases, {self.exact_dup_rows} exact and "
                f"{self.near_dup_rows} near duplicates dropped")


def normalise(text: str) -> str:
    """What counts as 'the same text': NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def row_text(row) -> str:
    return row if isinstance(row, str) else "\n".join(f"{m['role']}: {m['content']}" for m in row)


@dataclass
class Cleaner:
    filler_words: list[str] = field(default_factory=list)
    banned_phrases: list[str] = field(default_factory=list)
    dedup_exact: bool = False
    dedup_near: float | None = None
    counts: CleaningCounts = field(default_factory=CleaningCounts)

    def __post_init__(self):
        self._filler = _filler_pattern(self.filler_words)
        self._banned = [normalise(p) for p in self.banned_phrases]
        self._seen: set[int] = set()
        self._near = NearDuplicates(self.dedup_near) if self.dedup_near else None

    @classmethod
    def from_config(cls, cfg) -> "Cleaner":
        return cls(list(cfg.filler_words), list(cfg.banned_phrases), cfg.dedup_exact, cfg.dedup_near)

    @property
    def active(self) -> bool:
        return bool(self._filler or self._banned or self.dedup_exact or self._near)

    def __call__(self, row):
        """The cleaned row, or None when it is dropped."""
        if self._filler is not None:
            row = self._strip_fillers(row)
            if row is None:
                return None
        if self._banned:
            judged = row if isinstance(row, str) else " ".join(m["content"] for m in row if m["role"] == "assistant")
            text = normalise(judged)
            if any(p in text for p in self._banned):
                self.counts.banned_rows += 1
                return None
        if self.dedup_exact or self._near:
            text = normalise(row_text(row))
            if self.dedup_exact:
                h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
                if h in self._seen:
                    self.counts.exact_dup_rows += 1
                    return None
                self._seen.add(h)
            if self._near is not None and self._near.seen_before(text):
                self.counts.near_dup_rows += 1
                return None
        return row

    def _strip_fillers(self, row):
        if isinstance(row, str):
            out = _strip(self._filler, row)
            changed, empty = out != row, not out
        else:
            out, changed, empty = [], False, False
            for m in row:
                content = m["content"] if m["role"] == "system" else _strip(self._filler, m["content"])
                changed |= content != m["content"]
                empty |= not content
                out.append({**m, "content": content})
        self.counts.filler_rows += int(changed)
        if empty:
            self.counts.filler_emptied_rows += 1
            return None
        return out


def _filler_pattern(words: list[str]) -> re.Pattern | None:
    if not words:
        return None
    parts = []
    for w in sorted(words, key=len, reverse=True):
        esc = re.escape(w.strip())
        # A Latin filler is a whole word ("um", not the "um" in "umbrella"); CJK has no word
        # boundaries, so a repeated filler (嗯嗯嗯) goes as a whole.
        parts.append(rf"\b{esc}\b" if re.fullmatch(r"\w+", w.strip(), re.ASCII) else f"(?:{esc})+")
    # The filler takes its trailing comma with it: "Um, I need a quote" -> "I need a quote".
    return re.compile(rf"(?:{'|'.join(parts)})\s*[,，、]?\s*", re.IGNORECASE)


def _strip(pattern: re.Pattern, text: str) -> str:
    out, n = pattern.subn(" ", text)
    if not n:
        return text  # untouched: no whitespace tidying either, so the row does not count as changed
    out = re.sub(r"[ \t]{2,}", " ", out)
    out = re.sub(r" +([,.!?;:，。！？])", r"\1", out)
    return out.strip(" \t,，、")


class NearDuplicates:
    """MinHash over character shingles with banded LSH; a candidate counts when its estimated
    Jaccard similarity to a kept row reaches the threshold."""

    def __init__(self, threshold: float, seed: int = 1234):
        rng = np.random.default_rng(seed)
        self.threshold = threshold
        # multiply-shift hashing: random odd 64-bit multipliers, products wrap mod 2^64
        self._a = rng.integers(0, 2**64, PERMS, dtype=np.uint64) | np.uint64(1)
        self._b = rng.integers(0, 2**64, PERMS, dtype=np.uint64)
        self._buckets: dict[tuple[int, bytes], list[int]] = {}
        self._sigs: list[np.ndarray] = []

    def signature(self, text: str) -> np.ndarray:
        grams = {text[i:i + SHINGLE] for i in range(max(1, len(text) - SHINGLE + 1))}
        h = np.fromiter((zlib.crc32(g.encode()) for g in grams), dtype=np.uint64, count=len(grams))
        # (a*h + b) mod 2^64, top 32 bits: one cheap hash permutation per row of the signature
        return ((self._a[:, None] * h[None, :] + self._b[:, None]) >> np.uint64(32)).min(axis=1).astype(np.uint32)

    def seen_before(self, text: str) -> bool:
        sig = self.signature(text)
        rows = PERMS // BANDS
        keys = [(b, sig[b * rows:(b + 1) * rows].tobytes()) for b in range(BANDS)]
        candidates = {i for k in keys for i in self._buckets.get(k, ())}
        if any(np.mean(self._sigs[i] == sig) >= self.threshold for i in candidates):
            return True
        idx = len(self._sigs)
        self._sigs.append(sig)
        for k in keys:
            self._buckets.setdefault(k, []).append(idx)
        return False
