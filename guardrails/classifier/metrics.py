"""Detection measures, from scores alone: ROC-AUC, recall at a false-positive rate, and the
per-category, per-language table the README shows."""

from __future__ import annotations

import numpy as np


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a positive outscores a negative), ties counting half (the Mann-Whitney statistic)."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    scores = np.concatenate([pos, neg])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def threshold_at_fpr(neg: np.ndarray, fpr: float) -> float:
    """The lowest threshold at which at most `fpr` of `neg` score at or above it."""
    if len(neg) == 0:
        return 0.5
    s = np.sort(neg)[::-1]
    allowed = int(np.floor(fpr * len(s)))  # negatives that may pass
    if allowed >= len(s):
        return float(s[-1])
    return float(np.nextafter(s[allowed], np.inf))  # just above the first negative that must not pass


def recall_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float = 0.01) -> float:
    if len(pos) == 0:
        return float("nan")
    return float((pos >= threshold_at_fpr(neg, fpr)).mean())


def table(scores: np.ndarray, labels: list[tuple[str, ...]], langs: list[str], categories: tuple[str, ...],
          threshold: float | None = None, fpr: float = 0.01, flags=None, negatives: list[bool] | None = None,
          forms: list[str] | None = None) -> dict:
    """Detection by the `unsafe` score (column 0 of `scores`) against the negatives (default: every
    benign row; with `negatives`, those rows, and the other benign rows are reported apart as
    `twins`): per category (and per category and language) and per language, ROC-AUC and recall at
    `fpr`; with `threshold`, the share flagged at it and the negatives' share flagged. `flags(row) ->
    categories` adds, per category, the share of its flagged rows that were put in that category.
    `forms` (each row's variant: the seed as written, a disguise, after a turn, buried in a text) adds
    the attacks of each form against all the negatives: what a single vector of a mixed text loses."""
    unsafe = scores[:, 0]
    langs_arr = np.asarray(langs)
    attack = np.array([bool(ls) for ls in labels])
    benign = ~attack if negatives is None else np.asarray(negatives, dtype=bool) & ~attack
    flagged = unsafe >= threshold if threshold is not None else None
    out: dict = {"categories": {}, "languages": {}}
    for cat in categories:
        has = np.array([cat in ls for ls in labels])
        row = _cell(unsafe, has, benign, fpr, flagged)
        row["by_lang"] = {lang: _cell(unsafe, has & (langs_arr == lang), benign & (langs_arr == lang), fpr, flagged)
                          for lang in sorted(set(langs))}
        if flags is not None and flagged is not None:
            hit = np.flatnonzero(has & flagged)
            row["named"] = _mean(np.array([cat in flags(scores[i]) for i in hit]))
        out["categories"][cat] = row
    for lang in sorted(set(langs)):
        sel = langs_arr == lang
        out["languages"][lang] = _cell(unsafe, sel & attack, sel & benign, fpr, flagged)
    out["overall"] = _cell(unsafe, attack, benign, fpr, flagged)
    if forms is not None:
        forms_arr = np.asarray(forms)
        out["forms"] = {f: _cell(unsafe, attack & (forms_arr == f), benign, fpr, flagged)
                        for f in sorted(set(forms_arr[attack].tolist()))}
    if negatives is not None:
        twins = ~attack & ~benign
        out["twins"] = {"n": int(twins.sum()),
                        "recall_at_1pct_fpr_against_all_benign": _r(recall_at_fpr(unsafe[attack], unsafe[~attack], fpr))}
        if flagged is not None:
            out["twins"]["flagged"] = _mean(flagged[twins])
    return out


def _cell(score: np.ndarray, pos: np.ndarray, neg: np.ndarray, fpr: float, flagged: np.ndarray | None) -> dict:
    cell = {"n": int(pos.sum()), "benign": int(neg.sum()), "roc_auc": _r(roc_auc(score[pos], score[neg])),
            "recall_at_1pct_fpr": _r(recall_at_fpr(score[pos], score[neg], fpr))}
    if flagged is not None:
        cell["recall_at_threshold"] = _mean(flagged[pos])
        cell["fpr_at_threshold"] = _mean(flagged[neg])
    return cell


def _mean(x: np.ndarray) -> float:
    return _r(float(x.mean())) if len(x) else float("nan")


def _r(x: float) -> float:
    return round(x, 4) if x == x else x
