"""Fitting the head on frozen sentence embeddings, and calibrating its `unsafe` threshold on benign rows."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

from guardrails.classifier.head import Head
from guardrails.classifier.metrics import threshold_at_fpr
from guardrails.classifier.settings import TrainConfig


def fit_mlp(x: np.ndarray, y: np.ndarray, hidden: int, seed: int, epochs: int, alpha: float) -> tuple[list, list]:
    """One hidden ReLU layer, a sigmoid per output (multi-label), Adam with L2 `alpha`."""
    mlp = MLPClassifier(hidden_layer_sizes=(hidden,), alpha=alpha, batch_size=128, learning_rate_init=1e-3,
                        max_iter=epochs, random_state=seed, tol=1e-5, n_iter_no_change=epochs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a fixed epoch budget, by design
        mlp.fit(x, y)
    return [w.astype(np.float32) for w in mlp.coefs_], [b.astype(np.float32) for b in mlp.intercepts_]


def fit_ensemble(x: np.ndarray, y: np.ndarray, hidden: int, seed: int, epochs: int, alpha: float,
                 members: int) -> tuple[list, list]:
    """`members` MLPs from seeds seed, seed+1, ..., merged into one wide MLP whose logits are their mean:
    the same Head, `members` times the hidden width. Averaging lowers the variance that sets the 1%
    tail of benign scores, where one member's quirk would otherwise buy the threshold."""
    fits = [fit_mlp(x, y, hidden, seed + i, epochs, alpha) for i in range(members)]
    if members == 1:
        return fits[0]
    w0 = np.concatenate([w[0] for w, _ in fits], axis=1)
    b0 = np.concatenate([b[0] for _, b in fits])
    w1 = np.concatenate([w[1] for w, _ in fits], axis=0) / members
    b1 = np.mean([b[1] for _, b in fits], axis=0)
    return [w0, w1.astype(np.float32)], [b0, b1.astype(np.float32)]


def hard_negatives(unsafe: np.ndarray, top: float) -> np.ndarray:
    """Indices of the `top` share of benign rows by `unsafe` score: where the first head spends the
    false-positive budget."""
    if top <= 0 or len(unsafe) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(unsafe >= np.quantile(unsafe, 1 - top))


def fit_head(x: np.ndarray, y: np.ndarray, negatives: np.ndarray, cfg: TrainConfig) -> tuple[list, list]:
    """The head recipe: an ensemble fitted on (x, y); then, unless `cfg.hard_repeat` is 0, refitted with
    the rows of `negatives` (benign traffic features) that the first fit scored highest added
    `cfg.hard_repeat` more times. Measured on 2026-11-30: public attack sets' recall at 1% FPR .712 ->
    .733, their benign rows flagged .21% -> .17%, held-out .494 -> .505."""
    if cfg.head == "logreg":
        return fit_logreg(x, y)
    fit = fit_ensemble(x, y, cfg.hidden, cfg.seed, cfg.epochs, cfg.alpha, cfg.members)
    if cfg.hard_repeat < 1 or len(negatives) == 0:
        return fit
    from_first = Head(*fit).scores(negatives)[:, 0]
    hard = negatives[hard_negatives(from_first, cfg.hard_top)]
    x2 = np.concatenate([x, *[hard] * cfg.hard_repeat])
    y2 = np.concatenate([y, np.zeros((len(hard) * cfg.hard_repeat, y.shape[1]), dtype=y.dtype)])
    return fit_ensemble(x2, y2, cfg.hidden, cfg.seed, cfg.epochs, cfg.alpha, cfg.members)


def fit_logreg(x: np.ndarray, y: np.ndarray, c: float = 4.0) -> tuple[list, list]:
    """A balanced logistic regression per output (no hidden layer)."""
    w = np.zeros((x.shape[1], y.shape[1]), dtype=np.float32)
    b = np.zeros(y.shape[1], dtype=np.float32)
    for k in range(y.shape[1]):
        if y[:, k].min() == y[:, k].max():
            b[k] = 30.0 if y[0, k] else -30.0
            continue
        lr = LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(x, y[:, k])
        w[:, k], b[k] = lr.coef_[0], lr.intercept_[0]
    return [w], [b]


def calibrate(unsafe: np.ndarray, traffic: np.ndarray, fpr: float) -> float:
    """The lowest threshold on `unsafe` at which at most `fpr` of the benign traffic rows reach it, all
    languages together. Each language's share is measured on the test split. (The strictest of three
    per-language thresholds, each set by its top 14 or so rows, overshot: 0.35-0.66% of the test
    traffic flagged against a 1% budget.)"""
    return threshold_at_fpr(unsafe[traffic], fpr)
