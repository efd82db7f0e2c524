"""The trained classifier as a scanner: every category's score, and the categories of a flagged input.

It never blocks by itself: which categories block is the task's policy, applied by the Moderator.
Scores of recent texts are kept: an app resends its system prompt with every request, and a text the
second opinion reads costs tens of milliseconds or more.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from guardrails.classifier.categories import CATEGORIES
from guardrails.classifier.model import Classifier
from guardrails.scanners.base import Verdict


class ContentClassifier:
    name = "classifier"

    def __init__(self, path: Path | None = None, cache_size: int = 4096):
        self.path = path
        self._model: Classifier | None = None
        self.cache = ScoreCache(cache_size)

    @property
    def model(self) -> Classifier:
        if self._model is None:  # loaded on first use: the encoder's table is 65 MB
            self._model = Classifier.load(self.path)
        return self._model

    def scan(self, text: str) -> Verdict:
        return self.scan_many([text])[0]

    def scan_many(self, texts: list[str]) -> list[Verdict]:
        """One encoder batch for all of `texts` (a /v1/moderations request's inputs)."""
        model = self.model
        out = []
        for text, row in zip(texts, self.cache.scores(model.scores, texts)):
            scores = {c: round(float(s), 4) for c, s in zip(CATEGORIES, row[1:])}
            flags = tuple(model.flags(row))
            reason = f"unsafe {row[0]:.2f}: " + ", ".join(flags) if flags else ""
            out.append(Verdict(self.name, text, True, float(row[0]), reason, scores=scores, flags=flags))
        return out


class ScoreCache:
    """Score rows by a hash of their text, least recently used out first; bounded in entries (a row is
    18 floats). Thread-safe: moderation runs in worker threads."""

    def __init__(self, size: int):
        self.size, self.hits = size, 0
        self._rows: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def scores(self, score, texts: list[str]) -> np.ndarray:
        keys = [hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).digest() for t in texts]
        with self._lock:
            found = {k: self._rows[k] for k in keys if k in self._rows}
            for k in found:
                self._rows.move_to_end(k)
            self.hits += sum(k in found for k in keys)
        missing = {k: t for k, t in zip(keys, texts) if k not in found}  # each text once
        if missing:
            rows = score(list(missing.values()))
            found |= dict(zip(missing, rows))
            with self._lock:
                self._rows.update(zip(missing, rows))
                while len(self._rows) > self.size:
                    self._rows.popitem(last=False)
        return np.stack([found[k] for k in keys]) if keys else np.zeros((0, 0), dtype=np.float32)
