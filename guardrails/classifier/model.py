"""Texts in, category scores out: the classifier's view of each text, its encoder windows (all of a
batch encoded together), the head, and the highest score over a text's windows. A head trained with a
second opinion has the texts its first score routes there scored again over both encoders; one trained
with neighbours has each window's `unsafe` blended with its neighbour score (neighbours.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from guardrails.classifier import encoder, encoder_e5
from guardrails.classifier.categories import OUTPUTS
from guardrails.classifier.head import COMMITTED, Head
from guardrails.classifier.neighbours import Neighbours
from guardrails.classifier.second import SecondOpinion
from guardrails.classifier.segments import NEVER, segments
from guardrails.classifier.view import classifier_view


def bounded(text: str) -> str:
    """The characters the windows can come from: a long text's head and tail."""
    if len(text) > 2 * encoder.SCAN_CHARS:
        return f"{text[:encoder.SCAN_CHARS]}\n{text[-encoder.SCAN_CHARS // 4:]}"
    return text


def text_windows(text: str) -> list[str]:
    """The encoder windows of `text` as the classifier sees it. The view reads only the characters
    the windows can come from, so its cost is bounded too."""
    return encoder.windows(classifier_view(bounded(text)))


Encode = Callable[[list[str]], np.ndarray]


class Classifier:
    def __init__(self, head: Head, encode: Encode = encoder.encode, second: SecondOpinion | None = None,
                 encode_second: Encode = encoder_e5.encode, neighbours: Neighbours | None = None):
        self.head, self.encode = head, encode  # training passes caching encoders
        self.second, self.encode_second = second, encode_second
        self.neighbours = neighbours

    @property
    def offset(self) -> float | None:
        """How much less a line read alone counts than the whole text (segments.py); None: lines are
        not read alone (a head trained before 2026-12-01)."""
        record = self.head.card.get("segments")
        return float(record["offset"]) if record and record["offset"] < NEVER else None

    @classmethod
    def load(cls, path: Path | None = None) -> Classifier:
        path = Path(path) if path is not None else COMMITTED
        head = Head.load(path, encoder.DIM)
        second, near = head.card.get("second"), head.card.get("neighbours")
        return cls(head, second=SecondOpinion.load(path, second) if second else None,
                   neighbours=Neighbours.load(path, near, encoder.DIM) if near is not None else None)

    def save(self, out: Path) -> dict:
        """The second opinion's weights and the neighbours, then the head and its card (which names them)."""
        out.mkdir(parents=True, exist_ok=True)
        if self.second is not None:
            self.second.save(out)
        if self.neighbours is not None:
            self.neighbours.save(out)
        return self.head.save(out)

    def blend(self, scores: np.ndarray, near: np.ndarray | None) -> np.ndarray:
        return scores if near is None else self.neighbours.blend(scores, near)

    def scores(self, texts: list[str]) -> np.ndarray:
        """[n, OUTPUTS]: each text's score is its best window's (the second opinion's, where routed)."""
        return self.scored(texts)[0]

    def scored(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """`scores`, and the first head's scores beside them (equal where the text was not routed; both
        blended with the neighbours, where the head has them: the route reads the blended first score).
        With an offset, the windows of a text's lines read alone count that much less."""
        owners, flat, less = [], [], []
        line_offset = self.offset  # read from the card once a call, not once a text
        for i, text in enumerate(texts):
            parts = [(text_windows(text), 0.0)]
            if line_offset is not None:
                parts += [(text_windows(line), line_offset) for line in segments(bounded(text))]
            for ws, offset in parts:
                owners += [i] * len(ws)
                flat += ws
                less += [offset] * len(ws)
        owner, penalty = np.asarray(owners, dtype=np.int64), np.asarray(less, dtype=np.float32)[:, None]
        x = self.encode(flat)
        near = None if self.neighbours is None else self.neighbours.unsafe(x)  # once a window, for both heads
        first = _best(self.blend(self.head.scores(x), near) - penalty, owner, len(texts))
        out = first.copy()
        if self.second is not None:
            routed = first[:, 0] >= self.second.route
            rows = np.flatnonzero(routed[owner])  # the windows of routed texts
            if len(rows):
                again = self.second.scores(x[rows], self.encode_second([flat[i] for i in rows]))
                again = self.blend(again, None if near is None else near[rows]) - penalty[rows]
                out[routed] = _best(again, owner[rows], len(texts))[routed]
        return out, first

    def flags(self, row: np.ndarray) -> list[str]:
        return self.head.flags(row)


def _best(per_window: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((n, len(OUTPUTS)), dtype=np.float32)
    np.maximum.at(out, owner, per_window)
    return out
