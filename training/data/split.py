"""The train/eval split rule every data path shares."""

from __future__ import annotations


def eval_count(rows: int, eval_split: float) -> int:
    """Rows that go to eval: `eval_split` of them, rounded; a single row always stays in train."""
    return int(round(rows * eval_split)) if rows > 1 else 0
