"""Nearest neighbours: how much closer a window lies to the train split's attacks than to its benign rows.

The head draws one smooth boundary through the embedding space. An attack phrased like a few written
ones, in a corner the boundary cuts badly, is still near them. Its neighbour score is
sigmoid(scale * (mean of the `k` highest cosines to attack prototypes - the same to benign ones)),
where the prototypes are unit k-means centres of each class's train vectors (`prototypes.py`), and it is
blended into each window's `unsafe` as (1 - weight) * head + weight * neighbours. The other outputs,
which only name categories, are the head's.

The weight and scale are chosen on calib rows whose neighbours come only from other seed files
(`prototypes.choose`): attacks nobody wrote are not near a twin of themselves.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kernel.errors import GuardtuneError

FILE = "neighbours.npz"


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def top_mean(sims: np.ndarray, k: int) -> np.ndarray:
    """Each row's mean of its `k` highest values."""
    k = min(k, sims.shape[1])
    return np.partition(sims, -k, axis=1)[:, -k:].mean(axis=1)


def closer(x: np.ndarray, attacks: np.ndarray, benign: np.ndarray, k: int) -> np.ndarray:
    """How much closer each of `x` (unit rows) is to its `k` nearest attacks than to its `k` nearest benign."""
    return top_mean(x @ attacks.T, k) - top_mean(x @ benign.T, k)


def squash(diff: np.ndarray, scale: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(scale * diff, -30, 30)))


@dataclass
class Neighbours:
    attacks: np.ndarray  # [m, dim] unit prototypes
    benign: np.ndarray
    k: int
    scale: float
    weight: float

    def unsafe(self, x: np.ndarray) -> np.ndarray:
        """[n, dim] encoder vectors -> [n] neighbour scores in (0, 1)."""
        return squash(closer(unit(x), self.attacks, self.benign, self.k), self.scale)

    def blend(self, scores: np.ndarray, near: np.ndarray) -> np.ndarray:
        """A head's [n, OUTPUTS] scores of n windows, `unsafe` blended with their [n] neighbour scores
        (`unsafe(x)`, computed once a window however many heads read it)."""
        out = scores.copy()
        if len(near):
            out[:, 0] = (1 - self.weight) * scores[:, 0] + self.weight * near
        return out

    def record(self, chosen: dict) -> dict:
        """What the head's card says about them (`load` reads k, scale and weight back)."""
        return {"file": FILE, "per_class": len(self.attacks), "k": self.k, "scale": self.scale,
                "weight": self.weight, **chosen}

    def save(self, out: Path) -> None:
        """float32, as trained: the threshold was set on these very scores, and float16 would move them."""
        np.savez_compressed(out / FILE, attacks=self.attacks.astype(np.float32), benign=self.benign.astype(np.float32))

    @classmethod
    def load(cls, path: Path, record: object, dim: int) -> Neighbours | None:
        """The neighbours the card's `record` names (None where it names none: a blend of weight 0)."""
        if isinstance(record, dict) and "file" not in record:
            return None
        try:
            if not isinstance(record, dict):
                raise ValueError(f"the card's record of them is {record!r}, not an object")
            k, scale, weight = int(record["k"]), float(record["scale"]), float(record["weight"])
            with np.load(path / FILE, allow_pickle=False) as z:
                attacks, benign = z["attacks"].astype(np.float32), z["benign"].astype(np.float32)
            if attacks.ndim != 2 or benign.ndim != 2 or attacks.shape[1] != dim or benign.shape[1] != dim:
                raise ValueError(f"prototypes of {attacks.shape} and {benign.shape}, not [m, {dim}]")
            if k < 1 or not 0 <= weight <= 1 or not np.isfinite(scale) or not len(attacks) or not len(benign) \
                    or not (np.isfinite(attacks).all() and np.isfinite(benign).all()):
                raise ValueError(f"k {k}, weight {weight}, scale {scale}, {len(attacks)} and {len(benign)} prototypes")
        except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile, zlib.error) as e:
            raise GuardtuneError(f"classifier head at {path}: its neighbours ({FILE}): {e}") from None
        return cls(attacks, benign, k, scale, weight)
