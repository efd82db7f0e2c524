"""Banned topics: each topic is described by example phrases and matched by embedding similarity."""

from __future__ import annotations

from guardrails.scanners.base import Verdict
from kernel.encoder import embed, embed_windows


class BannedTopics:
    name = "banned_topics"

    def __init__(self, topics: dict[str, list[str]], threshold: float = 0.55):
        self.topics, self.threshold = topics, threshold
        self._index = None  # (vectors, topic name per row)

    def _load(self):
        names, phrases = [], []
        for topic, examples in self.topics.items():
            names += [topic] * len(examples)
            phrases += examples
        self._index = (embed(phrases), names)

    def scan(self, text: str) -> Verdict:
        if not self.topics:
            return Verdict(self.name, text, True, 0.0)
        if self._index is None:
            self._load()
        vectors, names = self._index
        sims = (vectors @ embed_windows(text).T).max(axis=1)  # each phrase's best window of the text
        best = int(sims.argmax())
        score = float(sims[best])
        if score >= self.threshold:
            return Verdict(self.name, text, False, score, f"banned topic '{names[best]}' ({score:.2f})")
        return Verdict(self.name, text, True, score)
