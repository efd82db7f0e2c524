"""Fitting the head on frozen sentence embeddings, and calibrating its `unsafe` threshold on benign rows."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

from guardrails.classifier.metrics import threshold_at_fpr


def fit_mlp(x: np.ndarray, y: np.ndarray, hidden: int, seed: int, epochs: int, alpha: float) -> tuple[list, list]:
    """One hidden ReLU layer, a sigmoid per output (multi-label), Adam with L2 `alpha`."""
    mlp = MLPClassifier(hidden_layer_sizes=(hidden,), alpha=alpha, batch_size=128, learning_rate_init=1e-3,
                        max_iter=epochs, random_state=seed, tol=1e-5, n_iter_no_change=epochs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a fixed epoch budget, by design
        mlp.fit(x, y)
    return [w.astype(np.float32) for w in mlp.coefs_], [b.astype(np.float32) for b in mlp.intercepts_]


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


def calibrate(unsafe: np.ndarray, langs: list[str], traffic: np.ndarray, fpr: float) -> float:
    """The lowest threshold on `unsafe` at which, in every language, at most `fpr` of the benign
    traffic rows reach it."""
    langs_arr = np.asarray(langs)
    return max((threshold_at_fpr(unsafe[traffic & (langs_arr == lang)], fpr) for lang in sorted(set(langs))
                if (traffic & (langs_arr == lang)).any()), default=0.5)
