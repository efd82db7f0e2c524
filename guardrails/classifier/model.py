"""Texts in, category scores out: the classifier's view of each text, its encoder windows (all of a
batch encoded together), the head, and the highest score over a text's windows."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from guardrails.classifier import encoder
from guardrails.classifier.categories import OUTPUTS
from guardrails.classifier.head import Head
from guardrails.classifier.view import classifier_view


def text_windows(text: str) -> list[str]:
    """The encoder windows of `text` as the classifier sees it. The view reads only the characters
    the windows can come from, so its cost is bounded too."""
    if len(text) > 2 * encoder.SCAN_CHARS:
        text = f"{text[:encoder.SCAN_CHARS]}\n{text[-encoder.SCAN_CHARS // 4:]}"
    return encoder.windows(classifier_view(text))


class Classifier:
    def __init__(self, head: Head, encode: Callable[[list[str]], np.ndarray] = encoder.encode):
        self.head, self.encode = head, encode  # training passes a caching encode

    @classmethod
    def load(cls, path: Path | None = None) -> Classifier:
        return cls(Head.load(path))

    def scores(self, texts: list[str]) -> np.ndarray:
        """[n, OUTPUTS]: each text's score is its best window's."""
        owners, flat = [], []
        for i, text in enumerate(texts):
            ws = text_windows(text)
            owners += [i] * len(ws)
            flat += ws
        per_window = self.head.scores(self.encode(flat))
        out = np.zeros((len(texts), len(OUTPUTS)), dtype=np.float32)
        np.maximum.at(out, np.asarray(owners, dtype=np.int64), per_window)
        return out

    def flags(self, row: np.ndarray) -> list[str]:
        return self.head.flags(row)
