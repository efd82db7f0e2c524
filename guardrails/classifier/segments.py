"""The lines of a multi-line text, each read on its own beside the whole.

One vector of a mixed text does not keep an attack in it: on the held-out split (2026-12-01) an
attack after a benign turn was caught at 0.46 and one buried in benign text at 0.23, against 0.69
as written. Read alone, its line scores as the attack it is. But every line is also one more chance
for a benign message to score high, so a line's score counts `offset` less than the whole's: the
offset is chosen on the calib split, where the false-positive budget is set (`choose_offset`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from guardrails.classifier.metrics import threshold_at_fpr

MOST = 8  # lines read alone, at most: the first and the last four (a bounded cost)
MIN_CHARS = 12  # a shorter line is not read alone
MAX_CHARS = 400  # nor a longer one (a paragraph the whole's windows read): each line costs one short window
NEVER = 1.0  # an offset under which no line decides (a score less 1): lines are then not read at all
OFFSETS = (0.0, 0.02, 0.05, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3, 0.4, NEVER)  # what `choose_offset` tries


def segments(text: str) -> list[str]:
    """The lines of a text of two or more lines that are read alone (MIN_CHARS to MAX_CHARS characters);
    [] for a text of one line, which its whole windows read."""
    lines = [s for s in (line.strip() for line in text.split("\n")) if s]
    if len(lines) < 2:
        return []
    lines = [s for s in lines if MIN_CHARS <= len(s) <= MAX_CHARS]
    half = MOST // 2
    return lines if len(lines) <= MOST else lines[:half] + lines[-half:]


def best_segment(texts: list[str], unsafe: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """Each text's highest `unsafe` score over its lines read alone (0 where it has none)."""
    lines = [segments(t) for t in texts]
    owner = [i for i, ls in enumerate(lines) for _ in ls]
    out = np.zeros(len(texts), dtype=np.float32)
    if owner:
        np.maximum.at(out, np.asarray(owner), unsafe([s for ls in lines for s in ls]))
    return out


def choose_offset(whole: np.ndarray, lines: np.ndarray, traffic: np.ndarray, attacks: np.ndarray,
                  fpr: float) -> tuple[float, float]:
    """The offset (of OFFSETS) under which the most calib attacks reach the threshold that holds the
    budget on calib traffic, and that recall; the larger offset on a tie (fewer lines decide).
    `whole`, `lines`: each text's `unsafe` score as a whole and its best line's."""
    best = (OFFSETS[-1], -1.0)
    for offset in reversed(OFFSETS):
        recall = recall_with(offset, whole, lines, traffic, attacks, fpr)
        if recall > best[1] + 1e-9:
            best = (offset, recall)
    return best


def recall_with(offset: float, whole: np.ndarray, lines: np.ndarray, traffic: np.ndarray, attacks: np.ndarray,
                fpr: float) -> float:
    """The share of attacks at or above the threshold that holds the budget on traffic, lines counting
    `offset` less (NEVER: the whole alone, as no line less 1 outscores it)."""
    unsafe = np.maximum(whole, lines - offset)
    return float((unsafe[attacks] >= threshold_at_fpr(unsafe[traffic], fpr)).mean())
