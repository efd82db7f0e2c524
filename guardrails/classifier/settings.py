"""The classifier's training settings: cheap to import, so the CLI can show its defaults without sklearn."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class TrainConfig:
    head: Literal["mlp", "logreg"] = "mlp"
    hidden: int = 256
    epochs: int = 60
    alpha: float = 0.1  # L2: strong, because the test of a head is text nobody here wrote
    members: int = 3  # MLPs averaged into one head (fit.fit_ensemble)
    traffic_weight: int = 2  # times each traffic row is trained on: the false-positive budget is spent on them
    hard_top: float = 0.10  # a second fit: the train traffic rows the first head scores highest, this share...
    hard_repeat: int = 2  # ...trained on this many more times (0: one fit)
    second: bool = True  # a second-opinion head over USE and e5 vectors, for the inputs routed to it (second.py)
    neighbours: bool = True  # each window's `unsafe` blended with its nearness to train attacks (neighbours.py)
    lines: bool = False  # opt-in (`--lines`): a multi-line text's lines read alone too, counting less (segments.py)
    route_share: float = 0.04  # the share of calib traffic routed there: ordinary traffic's p95 stays USE's
    fpr: float = 0.01  # the share of benign traffic allowed to be flagged (all languages together; fit.calibrate)
    per_group: int | None = None  # a slice: at most this many seeds per (split, language, category)
    seed: int = 0
