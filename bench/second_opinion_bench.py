"""The second opinion against the USE head alone, in one run: the committed classifier as served, the
same head without its second opinion or neighbours (recall at 1% FPR needs no threshold of its own), the classifier
as served but without its neighbours (neighbours.py; the same route), and as served but with a text's
lines not read alone, for a head trained with `--lines` (segments.py; the same route).
`bench/results/lines.md` is its run with such a head (2026-12-01).

- held-out: the test split's attacks against its traffic rows, overall and per language, and the
  share of its traffic flagged at the threshold by seed file (notices, follow-ups, replies...);
- latency: one input at a time, on a sample of the split's traffic and of its attacks, with the
  share the second opinion was asked about (it is asked about few ordinary messages, most attacks);
- external (--external DIR): JSONL sets kept outside the repository ({"text", "kind", "lang"}):
  recall at 1% FPR against their benign rows per kind and language, weighted by rows, and the share
  flagged at the threshold.

Window vectors come from guardtune's embedding caches (what `guardtune guard train` filled; anything
missing is encoded); latency is measured on the live encoders.
Results: bench/results/second_opinion.{json,md}.

    .venv/bin/python bench/second_opinion_bench.py [--external DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import results_io  # noqa: E402
from bench.detection import latency, load_external  # noqa: E402
from guardrails.classifier import encoder_e5, metrics  # noqa: E402
from guardrails.classifier.augment import augment  # noqa: E402
from guardrails.classifier.data import load_seeds  # noqa: E402
from guardrails.classifier.head import Head  # noqa: E402
from guardrails.classifier.model import Classifier  # noqa: E402
from guardrails.classifier.train import EmbeddingCache  # noqa: E402
from kernel.paths import cache_root  # noqa: E402

FPR = 0.01


def without_lines(clf: Classifier) -> Classifier:
    """`clf` reading each text whole only, as heads trained before 2026-12-01 did."""
    h = clf.head
    card = {k: v for k, v in h.card.items() if k != "segments"}
    return Classifier(Head(h.weights, h.biases, h.threshold, card), clf.encode, clf.second, clf.encode_second,
                      clf.neighbours)


def without_neighbours(clf: Classifier) -> Classifier:
    """`clf` with each window's `unsafe` the heads' alone, as heads trained before 2026-12-01 had it."""
    return Classifier(clf.head, clf.encode, clf.second, clf.encode_second)


def variants(clf: Classifier) -> dict[str, Classifier]:
    """`clf` without what it was trained with: its neighbours, its lines read alone."""
    return (({"served_without_neighbours": without_neighbours(clf)} if clf.neighbours is not None else {}) |
            ({"served_without_lines": without_lines(clf)} if clf.offset is not None else {}))


def cached(clf: Classifier) -> dict[str, Classifier]:
    """The served classifier, its USE head alone, and its `variants`, reading the embedding caches."""
    use = EmbeddingCache(cache_root() / "classifier" / "embeddings.npz")
    e5 = EmbeddingCache(cache_root() / "classifier" / "e5_embeddings.npz", encoder_e5.encode, encoder_e5.DIM)
    quiet = lambda m: None  # noqa: E731
    served = Classifier(clf.head, lambda w: use.encode(w, quiet), clf.second, lambda w: e5.encode(w, quiet),
                        clf.neighbours)
    return {"use_head_alone": Classifier(clf.head, served.encode), "served": served} | variants(served)


def held_out(both: dict[str, Classifier]) -> dict:
    test = [r for r in augment(load_seeds()) if r.split == "test"]
    traffic = np.array([r.traffic for r in test])
    attack = np.array([bool(r.labels) for r in test])
    langs = np.array([r.lang for r in test])
    out = {}
    for name, clf in both.items():
        s = clf.scores([r.text for r in test])[:, 0]
        out[name] = {lg: round(metrics.recall_at_fpr(s[attack & sel], s[traffic & sel]), 4)
                     for lg, sel in [("all", np.ones(len(test), bool))] + [(lg, langs == lg) for lg in ("en", "zh", "de")]}
    return out


def traffic_flagged(served: Classifier, threshold: float) -> dict:
    """The held-out traffic flagged at the threshold, by seed file: where the false positives come from."""
    test = [r for r in augment(load_seeds()) if r.split == "test" and r.traffic]
    sources, s = np.array([r.source for r in test]), served.scores([r.text for r in test])[:, 0]
    return {src: [int((sources == src).sum()), round(float((s[sources == src] >= threshold).mean()), 4)]
            for src in sorted(set(sources))}


def external(both: dict[str, Classifier], root: Path, threshold: float) -> dict:
    rows = load_external(root)
    kinds = np.array([r["kind"] for r in rows])
    groups = np.array([f"{r['kind']}/{r['lang']}" for r in rows])
    benign = kinds == "benign"
    out = {"rows": {g: int((groups == g).sum()) for g in sorted(set(groups[~benign]))}}
    for name, clf in both.items():
        s = clf.scores([r["text"][:4000] for r in rows])[:, 0]
        r1 = {g: metrics.recall_at_fpr(s[groups == g], s[benign]) for g in out["rows"]}
        out[name] = {"recall_at_1pct_fpr": round(float(sum(r1[g] * n for g, n in out["rows"].items()) /
                                                       (~benign).sum()), 4),
                     "by_kind": {g: round(v, 4) for g, v in r1.items()}}
        if name == "served":
            out[name] |= {"flagged": round(float((s[~benign] >= threshold).mean()), 4),
                          "benign_flagged": round(float((s[benign] >= threshold).mean()), 4),
                          "flagged_by_kind": {g: round(float((s[groups == g] >= threshold).mean()), 4)
                                              for g in out["rows"]}}
    return out


def run(root: Path | None) -> dict:
    clf = Classifier.load()
    both = cached(clf)
    test = [r for r in augment(load_seeds()) if r.split == "test"]
    rng = np.random.default_rng(0)
    samples = {k: [r.text for r in test if (r.traffic if k == "traffic" else r.labels)] for k in ("traffic", "attacks")}
    samples = {k: [v[i] for i in rng.permutation(len(v))] for k, v in samples.items()}  # the same rows for both
    res = {"meta": results_io.meta(route=clf.second.route, threshold=clf.head.threshold), "held_out": held_out(both),
           "traffic_flagged": traffic_flagged(both["served"], clf.head.threshold),
           "latency": {k: {name: latency(c, v) for name, c in
                           (("served", clf), ("use_head_alone", Classifier(clf.head)), *variants(clf).items())}
                       for k, v in samples.items()}}
    if root is not None:
        res["external"] = external(both, root, clf.head.threshold)
    return res


def lines(res: dict) -> list[str]:
    m, h = res["meta"], res["held_out"]
    out = [f"# The second opinion against the USE head alone ({m['date']}, {m['machine']})", "",
           f"Route {m['route']:.4f} on the first head's score; threshold {m['threshold']:.4f} on the served one.", "",
           "Held-out test split, recall at 1% FPR against its traffic rows:", ""]
    out += results_io.table(["classifier", "all", "en", "zh", "de"],
                            [[k, v["all"], v["en"], v["zh"], v["de"]] for k, v in h.items()])
    out += ["", f"Served over alone: {h['served']['all'] / h['use_head_alone']['all']:.2f}x."]
    for name, what in (("served_without_neighbours", "neighbours"), ("served_without_lines", "lines read alone")):
        if name in h:
            out += [f"Served over served without {what}: {h['served']['all'] / h[name]['all']:.2f}x."]
    out += ["",
            "Held-out traffic flagged at the threshold (served), by seed file:", ""]
    out += results_io.table(["seed file", "rows", "flagged"], [[k, *v] for k, v in res["traffic_flagged"].items()])
    out += ["", "Latency per input, one at a time, on samples of the test split:", ""]
    out += results_io.table(["inputs", "classifier", "routed", "p50 ms", "p95 ms", "max ms", "mean chars"],
                            [[k, name, v["routed"], v["p50_ms"], v["p95_ms"], v["max_ms"], v["mean_chars"]]
                             for k, per in res["latency"].items() for name, v in per.items()])
    if "external" in res:
        e = res["external"]
        names = [k for k in e if k != "rows"]
        out += ["", "Sets kept outside the repository, row-weighted recall at 1% FPR against their benign rows "
                f"(served: {e['served']['flagged']} of the attacks and {e['served']['benign_flagged']} of the "
                "benign rows flagged at the threshold):", ""]
        out += results_io.table(["classifier", "recall@1%FPR"], [[k, e[k]["recall_at_1pct_fpr"]] for k in names])
        out += ["", "By kind and language: served, flagged at the threshold; then each classifier's recall at 1% FPR:", ""]
        out += results_io.table(["kind/lang", "rows", "served flagged", *names],
                                [[g, n, e["served"]["flagged_by_kind"][g], *(e[k]["by_kind"][g] for k in names)]
                                 for g, n in e["rows"].items()])
    return out + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--external", type=Path, help="directory of JSONL sets kept outside the repository")
    a = p.parse_args()
    res = run(a.external)
    results_io.write(ROOT / "bench" / "results" / "second_opinion", res, lines(res))


if __name__ == "__main__":
    main()
