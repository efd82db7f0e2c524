"""The trained classifier as a scanner: every category's score, and the categories of a flagged input.

It never blocks by itself: which categories block is the task's policy, applied by the Moderator.
"""

from __future__ import annotations

from pathlib import Path

from guardrails.classifier.categories import CATEGORIES
from guardrails.classifier.model import Classifier
from guardrails.scanners.base import Verdict


class ContentClassifier:
    name = "classifier"

    def __init__(self, path: Path | None = None):
        self.path = path
        self._model: Classifier | None = None

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
        for text, row in zip(texts, model.scores(texts)):
            scores = {c: round(float(s), 4) for c, s in zip(CATEGORIES, row[1:])}
            flags = tuple(model.flags(row))
            reason = f"unsafe {row[0]:.2f}: " + ", ".join(flags) if flags else ""
            out.append(Verdict(self.name, text, True, float(row[0]), reason, scores=scores, flags=flags))
        return out
