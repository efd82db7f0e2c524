"""A deployment's operating point: the committed classifier head calibrated on benign traffic that
nobody here wrote (`guardtune guard calibrate`), measured on rows the calibration did not see, against
the committed threshold in the same run. Sets kept outside the repository are JSONL files
({"text", "kind", "lang"}, kind "benign" or an attack kind); a file is a source.

- half: the benign rows split in two by a hash of their text; calibrated on one half, the other half's
  false-positive rate and every attack's flagged share measured. Both ways, and each with the second
  opinion's route lowered to a threshold below it (as calibrate does) and kept where training put it.
- shift: each benign source left out in turn, the head calibrated on the others: the left-out
  source's false-positive rate (what happens when the traffic changes after calibrating).
- served: the injection patterns and the classifier together, as serving runs them, against the
  classifier alone, at 1% FPR, on the held-out test split and on the sets.

Results: bench/results/calibration.{json,md}.

    .venv/bin/python bench/calibration_bench.py --external DIR
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import results_io  # noqa: E402
from bench.detection import load_external  # noqa: E402
from guardrails.classifier import metrics  # noqa: E402
from guardrails.classifier.augment import augment  # noqa: E402
from guardrails.classifier.calibrate import OperatingPoint, operating_point  # noqa: E402
from guardrails.classifier.data import load_seeds  # noqa: E402
from guardrails.classifier.head import Head  # noqa: E402
from guardrails.classifier.model import Classifier  # noqa: E402
from guardrails.classifier.second import SecondOpinion  # noqa: E402
from guardrails.scanners.injection import Injection  # noqa: E402
from guardrails.scanners.normalise import Normalise  # noqa: E402

FPR = 0.01
T0 = time.perf_counter()
CHARS = 4000  # serving's default limits.max_input_chars


def half_of(text: str) -> int:
    return hashlib.sha256(text.encode("utf-8")).digest()[0] % 2


def pattern_hits(texts: list[str]) -> np.ndarray:
    """1.0 where an injection pattern matches the text as serving hands it on (normalised)."""
    norm, inj = Normalise(max_chars=10 * CHARS), Injection()
    return np.array([0.0 if inj.scan(norm.scan(t).text).valid else 1.0 for t in texts])


def attacks_flagged(scores: np.ndarray, rows: list[dict], threshold: float) -> dict:
    kinds = np.array([r["kind"] for r in rows])
    langs = np.array([r["lang"] for r in rows])
    out = {"all": _share(scores[kinds != "benign"] >= threshold)}
    for kind, lang in sorted({(k, lg) for k, lg in zip(kinds, langs) if k != "benign"}):
        out[f"{kind}/{lang}"] = _share(scores[(kinds == kind) & (langs == lang)] >= threshold)
    return out


@dataclass
class Scored:
    """Each row's `unsafe` score from the first head, and from the second opinion had it been asked."""
    first: np.ndarray
    second: np.ndarray | None

    def served(self, route: float | None) -> np.ndarray:
        return self.first if route is None else np.where(self.first >= route, self.second, self.first)

    def point(self, rows: np.ndarray, route: float | None, move_route: bool) -> OperatingPoint:
        """`guardtune guard calibrate` on `rows`; with `move_route` False, the route stays where training
        put it (what calibrate did until the evening of 2026-11-30)."""
        served = self.served(route)[rows]
        if not move_route:
            return OperatingPoint(metrics.threshold_at_fpr(served, FPR), route, served)
        return operating_point(self.first[rows], served, route, lambda idx: self.second[rows][idx], FPR)


def halves(route: float | None, rows: list[dict], sc: Scored) -> list[dict]:
    """Calibrated on one half of the benign rows, measured on the other; the route moved with the
    threshold (as calibrate does) and kept (as before), in the same run."""
    benign = [i for i, r in enumerate(rows) if r["kind"] == "benign"]
    out = []
    for side in (0, 1):
        fit = np.array([i for i in benign if half_of(rows[i]["text"]) == side])
        held = np.array([i for i in benign if half_of(rows[i]["text"]) != side])
        for moved in (True, False):
            p = sc.point(fit, route, moved)
            served = sc.served(p.route)
            out.append({"calibrated_on": len(fit), "route_moved": moved, "threshold": round(p.threshold, 4),
                        "route": None if p.route is None else round(p.route, 4),
                        "routed_unseen_half": _share(sc.first[held] >= p.route) if p.route is not None else 0.0,
                        "fpr_unseen_half": _share(served[held] >= p.threshold),
                        "flagged": attacks_flagged(served, rows, p.threshold)})
    return out


def shift(head: Head, route: float | None, rows: list[dict], sc: Scored) -> dict:
    benign = np.array([r["kind"] == "benign" for r in rows])
    sources = np.array([r["source"] for r in rows])
    committed = sc.served(route)
    out = {}
    for src in sorted(set(sources[benign])):
        fit = np.flatnonzero(benign & (sources != src))
        p = sc.point(fit, route, True)
        left = benign & (sources == src)
        out[src] = {"rows": int(left.sum()), "threshold": round(p.threshold, 4),
                    "fpr": _share(sc.served(p.route)[left] >= p.threshold),
                    "fpr_committed": _share(committed[left] >= head.threshold)}
    return out


def served(clf: Classifier, rows: list[dict], scores: np.ndarray) -> dict:
    """Recall at 1% FPR of the classifier alone and with the patterns (a match scores 1.0)."""
    union = np.maximum(scores, pattern_hits([r["text"][:CHARS] for r in rows]))
    benign = np.array([r["kind"] == "benign" for r in rows])
    test = [r for r in augment(load_seeds()) if r.split == "test"]
    test_scores = clf.scores([r.text for r in test])[:, 0]
    test_union = np.maximum(test_scores, pattern_hits([r.text for r in test]))
    traffic = np.array([r.traffic for r in test])
    attack = np.array([bool(r.labels) for r in test])
    return {"external": {"classifier": _r1(scores[~benign], scores[benign]),
                         "with_patterns": _r1(union[~benign], union[benign])},
            "test_split": {"classifier": _r1(test_scores[attack], test_scores[traffic]),
                           "with_patterns": _r1(test_union[attack], test_union[traffic])}}


def step(what: str) -> None:
    print(f"[calibration {time.perf_counter() - T0:6.0f} s] {what}", file=sys.stderr, flush=True)


def run(external: Path) -> dict:
    rows = load_external(external)
    if not any(r["kind"] == "benign" for r in rows):
        raise SystemExit(f"{external}: no benign rows to calibrate on")
    clf = Classifier.load()
    texts = [r["text"][:CHARS] for r in rows]
    step(f"{len(rows)} rows: the first head")
    first = Classifier(clf.head, neighbours=clf.neighbours).scores(texts)[:, 0]
    route = clf.second.route if clf.second else None
    asked = None if clf.second is None else Classifier(clf.head, second=SecondOpinion(clf.second.net, 0.0),
                                                       neighbours=clf.neighbours)
    step("the second opinion on every row")
    sc = Scored(first, None if asked is None else asked.scores(texts)[:, 0])  # every row asked, once
    step("calibrations, then the held-out split as served")
    scores = sc.served(route)
    benign = np.array([r["kind"] == "benign" for r in rows])
    return {"meta": results_io.meta(rows=len(rows), benign=int(benign.sum()), fpr=FPR,
                                    committed_threshold=round(clf.head.threshold, 4),
                                    committed_route=None if route is None else round(route, 4)),
            "committed": {"fpr": _share(scores[benign] >= clf.head.threshold),
                          "routed": _share(first[benign] >= route) if route is not None else 0.0,
                          "flagged": attacks_flagged(scores, rows, clf.head.threshold)},
            "halves": halves(route, rows, sc), "shift": shift(clf.head, route, rows, sc),
            "served": served(clf, rows, scores)}


def lines(res: dict) -> list[str]:
    m, com, hv = res["meta"], res["committed"], res["halves"]
    out = [f"# Calibrating to a deployment's traffic ({m['date']}, {m['machine']})", "",
           f"{m['rows']} rows kept outside the repository, {m['benign']} of them benign. The committed threshold "
           f"({m['committed_threshold']}) against the head calibrated by `guardtune guard calibrate` to "
           f"{m['fpr']:.0%} on one half of the benign rows, measured on the other half.", ""]
    keys = list(com["flagged"])
    out += results_io.table(
        ["threshold", "route", "benign routed", "benign flagged"] + keys,
        [[f"committed {m['committed_threshold']}", m["committed_route"], com["routed"], com["fpr"]] +
         [com["flagged"][k] for k in keys]] +
        [[f"half {i // 2} ({h['calibrated_on']} rows, route "
          f"{'moved' if h['route_moved'] else 'kept'}) {h['threshold']}", h["route"], h["routed_unseen_half"],
          h["fpr_unseen_half"]] + [h["flagged"][k] for k in keys] for i, h in enumerate(hv)])
    moved = [h for h in hv if h["route_moved"]]
    kept = [h for h in hv if not h["route_moved"]]
    gain = np.mean([h["flagged"]["all"] for h in moved]) / max(com["flagged"]["all"], 1e-9)
    over_kept = np.mean([h["flagged"]["all"] for h in moved]) / max(np.mean([h["flagged"]["all"] for h in kept]), 1e-9)
    out += ["", f"Attacks flagged, calibrated over committed: {gain:.2f}x; with the route moved over kept: "
            f"{over_kept:.3f}x.", "",
            "## Traffic that changes: each source left out of the calibration", ""]
    out += results_io.table(["left-out source", "rows", "threshold", "its FPR", "its FPR at the committed threshold"],
                            [[s, v["rows"], v["threshold"], v["fpr"], v["fpr_committed"]]
                             for s, v in res["shift"].items()])
    sv = res["served"]
    out += ["", "## As served: the injection patterns with the classifier (recall at 1% FPR)", ""]
    out += results_io.table(["rows", "classifier", "with the patterns"],
                            [[k, v["classifier"], v["with_patterns"]] for k, v in sv.items()])
    return out


def _r1(pos: np.ndarray, neg: np.ndarray) -> float:
    return round(metrics.recall_at_fpr(pos, neg, FPR), 4)


def _share(x: np.ndarray) -> float:
    return round(float(np.mean(x)), 4) if len(x) else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--external", type=Path, required=True, help="directory of JSONL sets kept outside the repository")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "calibration")
    args = p.parse_args()
    res = run(args.external)
    results_io.write(args.out, res, lines(res))


if __name__ == "__main__":
    main()
