"""A deployment's operating point: the committed classifier head calibrated on benign traffic that
nobody here wrote (`guardtune guard calibrate`), measured on rows the calibration did not see, against
the committed threshold in the same run. Sets kept outside the repository are JSONL files
({"text", "kind", "lang"}, kind "benign" or an attack kind); a file is a source.

- half: the benign rows split in two by a hash of their text; calibrated on one half, the other half's
  false-positive rate and every attack's flagged share measured. Both ways.
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
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import results_io  # noqa: E402
from bench.detection import load_external  # noqa: E402
from guardrails.classifier import metrics  # noqa: E402
from guardrails.classifier.augment import augment  # noqa: E402
from guardrails.classifier.calibrate import calibrated  # noqa: E402
from guardrails.classifier.data import load_seeds  # noqa: E402
from guardrails.classifier.head import Head  # noqa: E402
from guardrails.classifier.model import Classifier  # noqa: E402
from guardrails.scanners.injection import Injection  # noqa: E402
from guardrails.scanners.normalise import Normalise  # noqa: E402

FPR = 0.01
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


def halves(head: Head, rows: list[dict], scores: np.ndarray) -> list[dict]:
    benign = [i for i, r in enumerate(rows) if r["kind"] == "benign"]
    out = []
    for side in (0, 1):
        fit = np.array([i for i in benign if half_of(rows[i]["text"]) == side])
        held = np.array([i for i in benign if half_of(rows[i]["text"]) != side])
        cal = calibrated(head, scores[fit], FPR, f"half {side}")
        out.append({"calibrated_on": len(fit), "threshold": round(cal.threshold, 4),
                    "fpr_unseen_half": _share(scores[held] >= cal.threshold),
                    "flagged": attacks_flagged(scores, rows, cal.threshold)})
    return out


def shift(head: Head, rows: list[dict], scores: np.ndarray) -> dict:
    benign = np.array([r["kind"] == "benign" for r in rows])
    sources = np.array([r["source"] for r in rows])
    out = {}
    for src in sorted(set(sources[benign])):
        fit = np.flatnonzero(benign & (sources != src))
        cal = calibrated(head, scores[fit], FPR, f"all but {src}")
        left = benign & (sources == src)
        out[src] = {"rows": int(left.sum()), "threshold": round(cal.threshold, 4),
                    "fpr": _share(scores[left] >= cal.threshold),
                    "fpr_committed": _share(scores[left] >= head.threshold)}
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


def run(external: Path) -> dict:
    rows = load_external(external)
    if not any(r["kind"] == "benign" for r in rows):
        raise SystemExit(f"{external}: no benign rows to calibrate on")
    clf = Classifier.load()
    scores = clf.scores([r["text"][:CHARS] for r in rows])[:, 0]
    benign = np.array([r["kind"] == "benign" for r in rows])
    return {"meta": results_io.meta(rows=len(rows), benign=int(benign.sum()), fpr=FPR,
                                    committed_threshold=round(clf.head.threshold, 4)),
            "committed": {"fpr": _share(scores[benign] >= clf.head.threshold),
                          "flagged": attacks_flagged(scores, rows, clf.head.threshold)},
            "halves": halves(clf.head, rows, scores), "shift": shift(clf.head, rows, scores),
            "served": served(clf, rows, scores)}


def lines(res: dict) -> list[str]:
    m, com, hv = res["meta"], res["committed"], res["halves"]
    out = [f"# Calibrating to a deployment's traffic ({m['date']}, {m['machine']})", "",
           f"{m['rows']} rows kept outside the repository, {m['benign']} of them benign. The committed threshold "
           f"({m['committed_threshold']}) against the head calibrated by `guardtune guard calibrate` to "
           f"{m['fpr']:.0%} on one half of the benign rows, measured on the other half.", ""]
    keys = list(com["flagged"])
    out += results_io.table(
        ["threshold", "benign flagged"] + keys,
        [[f"committed {m['committed_threshold']}", com["fpr"]] + [com["flagged"][k] for k in keys]] +
        [[f"half {i} ({h['calibrated_on']} rows) {h['threshold']}", h["fpr_unseen_half"]] +
         [h["flagged"][k] for k in keys] for i, h in enumerate(hv)])
    gain = np.mean([h["flagged"]["all"] for h in hv]) / max(com["flagged"]["all"], 1e-9)
    out += ["", f"Attacks flagged, calibrated over committed: {gain:.2f}x.", "",
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
