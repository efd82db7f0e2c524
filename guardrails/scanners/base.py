"""The scanner contract: text in; verdict, score, reason and possibly sanitised text out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Verdict:
    scanner: str
    text: str  # the (possibly sanitised) text for the next scanner and the model
    valid: bool  # False: block the request
    score: float  # 0 = clean, 1 = certain violation
    reason: str = ""
    scores: dict[str, float] = field(default_factory=dict)  # per category, for scanners that score several
    flags: tuple[str, ...] = ()  # the categories over their threshold; blocking is the task's policy
    waived: tuple[str, ...] = ()  # categories it raised that the policy let through (set by moderation.judge)


class Scanner(Protocol):
    name: str

    def scan(self, text: str) -> Verdict: ...
