"""Part 5 of guard_bench: detection on the held-out test split, in one run.

- the trained classifier (USE multilingual v3 + the committed head blended with its neighbours, and its
  second opinion over USE and e5 vectors for the inputs routed to it), as serving runs it;
- the USE head alone, without the second opinion or the neighbours (its recall at 1% FPR: no threshold
  of its own);
- today's baseline before it: the injection patterns plus MiniLM similarity to exemplars;
- the same head trained here on the English MiniLM instead of USE (the encoder choice, measured).

Each reports ROC-AUC and recall at 1% FPR per category and per language against the test split's
traffic rows (guardrails/classifier/data.py), and apart the share of the twins of attacks flagged; the
classifier also at its committed threshold (set on the calib split, never on test), with per-input
latency (p50/p95, one input at a time) and a 32-input batch, for traffic and for attacks apart: the
second opinion is asked about most attacks and few ordinary messages.
`--external DIR` scores JSONL files that are not in the project ({"text", "kind", "lang"}, kind
"benign" or an attack kind), e.g. public sets: per kind and language, the share flagged at the
committed threshold and the recall at 1% FPR against DIR's own benign rows.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench import results_io
from bench.legacy_injection import PatternsPlusSimilarity
from guardrails.classifier import metrics
from guardrails.classifier.augment import augment
from guardrails.classifier.categories import CATEGORIES, OUTPUTS
from guardrails.classifier.data import load_seeds
from guardrails.classifier.fit import fit_head
from guardrails.classifier.head import Head
from guardrails.classifier.model import Classifier
from guardrails.classifier.settings import TrainConfig
from guardrails.classifier.train import fit_order, targets
from kernel.encoder import embed


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))], 2)


def latency(clf: Classifier, texts: list[str], n: int = 400) -> dict:
    clf.scores(texts[:2])  # load
    first = Classifier(clf.head, neighbours=clf.neighbours).scores(texts[:n])[:, 0]  # what the route reads
    routed = float((first >= clf.second.route).mean()) if clf.second else 0.0
    times = []
    for text in texts[:n]:
        t0 = time.perf_counter()
        clf.scores([text])
        times.append((time.perf_counter() - t0) * 1000)
    batch = texts[:32]
    t0 = time.perf_counter()
    clf.scores(batch)
    batch_ms = (time.perf_counter() - t0) * 1000
    return {"inputs": len(times), "routed": round(routed, 4), "p50_ms": _pct(times, 0.5), "p95_ms": _pct(times, 0.95),
            "max_ms": round(max(times), 2), "mean_chars": round(statistics.mean(len(t) for t in texts[:n])),
            "batch32_ms": round(batch_ms, 1), "batch32_per_input_ms": round(batch_ms / len(batch), 2)}


def minilm_head(train_rows, test_rows) -> np.ndarray:
    """The classifier's head recipe (TrainConfig's defaults) on MiniLM embeddings (English-only encoder): test scores."""
    cfg = TrainConfig()
    order = fit_order(train_rows, cfg.traffic_weight)  # each text embedded once
    vectors = embed([r.text for r in train_rows])
    negatives = vectors[[i for i, r in enumerate(train_rows) if r.traffic]]
    x, train_rows = vectors[order], [train_rows[i] for i in order]
    weights, biases = fit_head(x, targets(train_rows), negatives, cfg)
    return Head(weights, biases).scores(embed([r.text for r in test_rows]))


def run(external: Path | None = None) -> dict:
    """Each part logs on stderr as it starts: the whole takes about an hour on 2 cores."""
    t0 = time.perf_counter()

    def step(what: str) -> None:
        print(f"[detection {time.perf_counter() - t0:6.0f} s] {what}", file=sys.stderr, flush=True)

    step("seeds and their variants")
    rows = augment(load_seeds())
    train, test = [r for r in rows if r.split == "train"], [r for r in rows if r.split == "test"]
    labels, langs, traffic = [r.labels for r in test], [r.lang for r in test], [r.traffic for r in test]
    clf = Classifier.load()
    texts = [r.text for r in test]
    rng = np.random.default_rng(0)  # latency on a sample of each kind, not the split's first rows
    kinds = {"traffic": [t for t, r in zip(texts, test) if r.traffic],
             "attacks": [t for t, r in zip(texts, test) if r.labels]}
    step(f"baseline on {len(test)} test rows")
    legacy = PatternsPlusSimilarity()
    base = np.zeros((len(test), len(OUTPUTS)), dtype=np.float32)
    base[:, 0] = [legacy.score(t) for t in texts]  # one score for everything: it only knows injection
    out = {"meta": results_io.meta(test_rows=len(test), train_rows=len(train), threshold=clf.head.threshold),
           "baseline": metrics.table(base, labels, langs, CATEGORIES, legacy.THRESHOLD, negatives=traffic)}
    step("the classifier, with its second opinion")
    out["classifier"] = metrics.table(clf.scores(texts), labels, langs, CATEGORIES, clf.head.threshold, 0.01,
                                      clf.flags, traffic, [r.variant for r in test])
    step("the USE head alone")
    out["use_head_alone"] = metrics.table(Classifier(clf.head).scores(texts), labels, langs, CATEGORIES,
                                          negatives=traffic)
    step(f"the head trained on MiniLM ({len(train)} train rows)")
    out["minilm_head"] = metrics.table(minilm_head(train, test), labels, langs, CATEGORIES, negatives=traffic)
    step("latency")
    out["latency"] = {k: latency(clf, [v[i] for i in rng.permutation(len(v))]) for k, v in kinds.items()}
    if external is not None:
        step(f"external sets in {external}")
        out["external"] = external_sets(clf, legacy, external)
    step("done")
    return out


def external_sets(clf: Classifier, legacy: PatternsPlusSimilarity, root: Path) -> dict:
    """Per attack kind and language: flagged at the committed threshold (the baseline at its own),
    and recall at 1% FPR against every benign row in `root`."""
    rows = load_external(root)
    texts = [r["text"][:4000] for r in rows]
    ours = clf.scores(texts)[:, 0]
    base = np.array([legacy.score(t) for t in texts])
    kinds = np.array([r["kind"] for r in rows])
    langs = np.array([r["lang"] for r in rows])
    benign = kinds == "benign"
    out = {"benign": {"rows": int(benign.sum()), "classifier": _share(ours[benign] >= clf.head.threshold),
                      "baseline": _share(base[benign] >= legacy.THRESHOLD)}}
    for kind, lang in sorted({(k, lg) for k, lg in zip(kinds, langs) if k != "benign"}):
        sel = (kinds == kind) & (langs == lang)
        out[f"{kind}/{lang}"] = {
            "rows": int(sel.sum()), "classifier": _share(ours[sel] >= clf.head.threshold),
            "baseline": _share(base[sel] >= legacy.THRESHOLD),
            "classifier_r1": round(metrics.recall_at_fpr(ours[sel], ours[benign]), 4),
            "baseline_r1": round(metrics.recall_at_fpr(base[sel], base[benign]), 4)}
    return out


def load_external(root: Path) -> list[dict]:
    """Every row of `root`'s JSONL files, each with its file's stem as its `source`."""
    return [{**json.loads(line), "source": path.stem} for path in sorted(root.glob("*.jsonl"))
            for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def _share(x: np.ndarray) -> float:
    return round(float(x.mean()), 4) if len(x) else float("nan")


def lines(res: dict | None) -> list[str]:
    if res is None:
        return []
    info, ours, base, mini = res["meta"], res["classifier"], res["baseline"], res["minilm_head"]
    alone = res.get("use_head_alone") or {"overall": {}, "categories": {}}
    twins = ours["twins"]
    out = [f"Detection on the held-out test split ({info['test_rows']} rows: {ours['overall']['n']} attacks, "
           f"{ours['overall']['benign']} rows of customer-service and assistant traffic, {twins['n']} benign twins of "
           f"attacks; measured {info['date']} on {info['machine']}). Recall at 1% FPR is against the traffic rows; "
           "'flagged' is at the committed threshold (set on the calib split's traffic, never on test); "
           "'named' is the share of a category's flagged rows that the classifier put in that category:", ""]
    rows = []
    for cat in [*CATEGORIES, "(any)"]:
        c = ours["overall"] if cat == "(any)" else ours["categories"][cat]
        b = base["overall"] if cat == "(any)" else base["categories"][cat]
        m = mini["overall"] if cat == "(any)" else mini["categories"][cat]
        a = alone["overall"] if cat == "(any)" else alone["categories"].get(cat, {})
        by = c.get("by_lang", {})
        rows.append([cat, c["n"], c["roc_auc"], c["recall_at_1pct_fpr"], c["recall_at_threshold"],
                     *(by[lg]["recall_at_1pct_fpr"] if lg in by else "" for lg in ("en", "zh", "de")),
                     c.get("named", ""), a.get("recall_at_1pct_fpr", ""), m["recall_at_1pct_fpr"], b["roc_auc"],
                     b["recall_at_1pct_fpr"]])
    out += results_io.table(["category", "rows", "AUC", "recall@1%FPR", "flagged", "en r@1%", "zh r@1%", "de r@1%",
                             "named", "USE head alone r@1%", "MiniLM head r@1%", "baseline AUC", "baseline r@1%"],
                            rows)
    out += ["", f"At the threshold the classifier flags {ours['overall']['fpr_at_threshold']} of the traffic rows "
            f"and {twins['flagged']} of the twins. Against every benign row, twins included, its recall at 1% FPR "
            f"is {twins['recall_at_1pct_fpr_against_all_benign']}."]
    out += ["", "Per language (every attack row against that language's traffic rows):", ""]
    out += results_io.table(
        ["language", "attack rows", "traffic rows", "AUC", "recall@1%FPR", "flagged", "traffic flagged",
         "baseline recall@1%FPR"],
        [[lg, v["n"], v["benign"], v["roc_auc"], v["recall_at_1pct_fpr"], v["recall_at_threshold"],
          v["fpr_at_threshold"], base["languages"][lg]["recall_at_1pct_fpr"]] for lg, v in ours["languages"].items()])
    if "forms" in ours:
        out += ["", "Per form of attack (each form's attack rows against all the traffic rows; 'seed': as written):", ""]
        out += results_io.table(["form", "attack rows", "AUC", "recall@1%FPR", "flagged"],
                                [[f, v["n"], v["roc_auc"], v["recall_at_1pct_fpr"], v["recall_at_threshold"]]
                                 for f, v in ours["forms"].items()])
    out += ["", "Classifier latency per input, one at a time, on a sample of the test split's rows of each kind "
            "('routed': the share the second opinion was asked about):", ""]
    lat = res["latency"] if "p50_ms" not in res["latency"] else {"all": res["latency"]}
    out += results_io.table(["inputs", "rows", "mean chars", "routed", "p50 ms", "p95 ms", "max ms",
                             "batch of 32, ms per input"],
                            [[k, v["inputs"], v["mean_chars"], v.get("routed", ""), v["p50_ms"], v["p95_ms"],
                              v["max_ms"], v["batch32_per_input_ms"]] for k, v in lat.items()])
    if res.get("external"):
        ext = res["external"]
        out += ["", f"On sets the project did not write (kept outside the repository; see the README): "
                f"{ext['benign']['rows']} benign rows, of which the classifier flags {ext['benign']['classifier']} "
                f"and the baseline {ext['benign']['baseline']}:", ""]
        out += results_io.table(["kind/lang", "rows", "flagged", "recall@1%FPR", "baseline flagged",
                                 "baseline recall@1%FPR"],
                                [[k, v["rows"], v["classifier"], v["classifier_r1"], v["baseline"], v["baseline_r1"]]
                                 for k, v in ext.items() if k != "benign"])
    return out + [""]
