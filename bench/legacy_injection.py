"""The injection check before the classifier, kept for comparison only: the RE2 patterns, then
MiniLM cosine similarity to a list of exemplar attacks (threshold 0.62). Not used by serving."""

from __future__ import annotations

from pathlib import Path

from guardrails.scanners.injection import Injection
from kernel.encoder import embed, embed_windows

EXEMPLARS = Path(__file__).resolve().parent / "data" / "injection_exemplars.txt"
THRESHOLD = 0.62


class PatternsPlusSimilarity:
    name = "patterns+similarity"
    THRESHOLD = THRESHOLD

    def __init__(self):
        self.patterns = Injection()
        lines = EXEMPLARS.read_text(encoding="utf-8").splitlines()
        self.vectors = embed([x.strip() for x in lines if x.strip() and not x.startswith("#")])

    def score(self, text: str) -> float:
        """1.0 on a pattern match, else the best exemplar similarity (a score, for ROC-AUC)."""
        if not self.patterns.scan(text).valid:
            return 1.0
        return float((self.vectors @ embed_windows(text).T).max())
