"""Fitting the neighbours (neighbours.py) in training: each class's prototypes, then the blend's weight
and scale. Kept apart from neighbours.py so that serving does not load sklearn."""

from __future__ import annotations

import hashlib

import numpy as np
from sklearn.cluster import MiniBatchKMeans

from guardrails.classifier.metrics import recall_at_fpr
from guardrails.classifier.neighbours import Neighbours, closer, squash, unit

PER_CLASS = 512  # k-means centres per class: 2 MB of float32 for both, well under a millisecond a window
K = 3
FOLDS = 4  # the seed files fall into this many folds for choosing the blend
WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
SCALES = (5.0, 10.0, 20.0)


def centres(x: np.ndarray, most: int, seed: int) -> np.ndarray:
    """At most `most` unit k-means centres of the unit rows `x` (a fourth as many as rows, for a small slice)."""
    n = min(most, max(1, len(x) // 4))
    if len(x) <= n:
        return unit(x)
    km = MiniBatchKMeans(n, random_state=seed, batch_size=4096, n_init=1).fit(x)
    return unit(km.cluster_centers_)


def prototypes(x: np.ndarray, attack: np.ndarray, seed: int, most: int = PER_CLASS) -> tuple[np.ndarray, np.ndarray]:
    """The attack rows' centres and the benign rows' centres."""
    x = unit(x)
    return centres(x[attack], most, seed), centres(x[~attack], most, seed)


def fold_of(source: str) -> int:
    return int(hashlib.sha256(source.encode()).hexdigest()[:8], 16) % FOLDS


def held_out_closeness(train_x: np.ndarray, train_attack: np.ndarray, train_fold: np.ndarray, calib_x: np.ndarray,
                       calib_fold: np.ndarray, seed: int) -> np.ndarray:
    """Each calib vector's `closer`, its prototypes fitted only on train rows of the other folds' seed
    files (all of them where a fold would leave a class empty: a small slice)."""
    out = np.zeros(len(calib_x), dtype=np.float32)
    for fold in range(FOLDS):
        rows = calib_fold == fold
        if not rows.any():
            continue
        keep = train_fold != fold
        if not (keep & train_attack).any() or not (keep & ~train_attack).any():
            keep = np.ones(len(train_x), dtype=bool)
        attacks, benign = prototypes(train_x[keep], train_attack[keep], seed)
        out[rows] = closer(unit(calib_x[rows]), attacks, benign, K)
    return out


def choose(served: np.ndarray, diff: np.ndarray, traffic: np.ndarray, attacks: np.ndarray,
           fpr: float) -> tuple[float, float, float, float]:
    """(weight, scale, calib recall with them, recall without): of WEIGHTS x SCALES, the blend under which
    the most calib attacks reach the threshold that holds the budget on calib traffic; weight 0 unless
    one does better, the smaller weight on a tie. `served`: each calib text's `unsafe` score as served
    without neighbours; `diff`: its first window's held-out `closer`."""
    without = recall_at_fpr(served[attacks], served[traffic], fpr)
    best = (0.0, SCALES[0], without)
    for weight in WEIGHTS:
        for scale in SCALES:
            blended = (1 - weight) * served + weight * squash(diff, scale)
            recall = recall_at_fpr(blended[attacks], blended[traffic], fpr)
            if recall > best[2] + 1e-9:
                best = (weight, scale, recall)
    return (*best, without)


def fit_neighbours(train_x: np.ndarray, train_attack: np.ndarray, weight: float, scale: float,
                   seed: int) -> Neighbours:
    """Prototypes of every train row, at the chosen blend."""
    attacks, benign = prototypes(train_x, train_attack, seed)
    return Neighbours(attacks, benign, K, scale, weight)
