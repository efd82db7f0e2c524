"""A head's threshold set on a deployment's own benign traffic (`guardtune guard calibrate`).

The committed threshold is set on the project's traffic rows, many of them hard negatives written to
look like attacks, so on ordinary customer-service traffic it spends far less than its budget (0.42%
of the public sets' benign rows flagged against 1%). An operator's own messages put the threshold
where their budget is. Unlabelled logs that hold a few attacks only raise it: the safe direction.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from guardrails.classifier import metrics
from guardrails.classifier.head import CARD, WEIGHTS, Head
from guardrails.classifier.model import Classifier
from guardrails.classifier.neighbours import FILE as NEIGHBOURS
from guardrails.classifier.second import FILE as SECOND
from guardrails.classifier.second import SecondOpinion
from kernel.errors import GuardtuneError

FLAGS_NEEDED = 5  # benign rows that must land above the threshold: fewer and one message moves it
MAX_ROWS = 200_000  # more rows do not sharpen a 1% quantile
MAX_BYTES = 256 << 20  # the file is held in memory
MAX_LINE = 1 << 20
BATCH = 256


def min_rows(fpr: float) -> int:
    return math.ceil(FLAGS_NEEDED / fpr)


def read_traffic(path: Path, limit: int = MAX_ROWS) -> list[str]:
    """Benign messages: JSONL with a string "text" per line, or audit records (a `.jsonl` file), else one
    message per line. Blank lines are skipped; a bad line is an error that names it."""
    jsonl = path.suffix.lower() == ".jsonl"
    texts: list[str] = []
    try:
        if path.stat().st_size > MAX_BYTES:
            raise GuardtuneError(f"{path}: larger than {MAX_BYTES >> 20} MiB; a sample of it sets the same threshold")
        with path.open(encoding="utf-8-sig") as f:
            for n, line in enumerate(iter(lambda: f.readline(MAX_LINE + 1), ""), 1):
                if len(line) > MAX_LINE:
                    raise GuardtuneError(f"{path}:{n}: longer than {MAX_LINE} characters")
                if not line.strip():
                    continue
                if len(texts) == limit:
                    raise GuardtuneError(f"{path}: more than {limit} messages; a sample of them sets the same "
                                         "threshold")
                texts.append(_jsonl_text(line, path, n) if jsonl else line.rstrip("\r\n"))
    except (OSError, UnicodeDecodeError) as e:
        raise GuardtuneError(f"{path}: {e}") from None
    return texts


def _jsonl_text(line: str, path: Path, n: int) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise GuardtuneError(f"{path}:{n}: not JSON ({e.msg})") from None
    except RecursionError:
        raise GuardtuneError(f"{path}:{n}: JSON nested too deeply") from None
    text = row.get("text") if isinstance(row, dict) else None
    if text is None and isinstance(row, dict) and isinstance(row.get("prompt"), list):
        text = _last_user_turn(row["prompt"])
    if not isinstance(text, str):
        raise GuardtuneError(f'{path}:{n}: each line needs a string "text", or is an audit record with a user '
                             'turn in its "prompt"')
    return text


def _last_user_turn(messages: list) -> str | None:
    """An audit record (`guardtune audit --json`): the request's newest user message, the one its
    request added (earlier turns repeat across a conversation's requests)."""
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, list):  # content parts: their text
                content = "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
            return content if isinstance(content, str) else None
    return None


def unsafe_scores(clf: Classifier, texts: list[str], log: Callable[[str], None]) -> np.ndarray:
    return scored(clf, texts, log)[0]


def scored(clf: Classifier, texts: list[str], log: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray]:
    """Each text's `unsafe` score as served, and the first head's, in batches (as serving's batches would)."""
    served, first = [], []
    for i in range(0, len(texts), BATCH):
        s, f = clf.scored(texts[i:i + BATCH])
        served.append(s[:, 0])
        first.append(f[:, 0])
        log(f"scored {min(i + BATCH, len(texts))}/{len(texts)}")
    empty = np.zeros(0, dtype=np.float32)
    return (np.concatenate(served), np.concatenate(first)) if texts else (empty, empty)


def check_fpr(fpr: float) -> None:
    if not 0 < fpr <= 0.5:
        raise GuardtuneError(f"--fpr must be in (0, 0.5], got {fpr}")


@dataclass
class OperatingPoint:
    threshold: float  # the lowest at which at most the budget of the messages is flagged, on the score served
    route: float | None  # the second opinion's route beneath it (None: no second opinion)
    served: np.ndarray  # each message's `unsafe` score as served at that route


def operating_point(first: np.ndarray, served: np.ndarray, route: float | None,
                    ask: Callable[[np.ndarray], np.ndarray] | None, fpr: float) -> OperatingPoint:
    """The threshold for messages scored `served` at `route`, whose first-head scores are `first`;
    `ask(indices)` gives the second opinion's scores of those messages. A threshold below the route
    would let the first head alone decide the messages between them, so the route is lowered to the
    threshold and the messages it adds are asked too, until the threshold stays at or above it (each
    step lowers the route and asks only the messages it adds; a few steps settle it)."""
    served = served.copy()
    threshold = metrics.threshold_at_fpr(served, fpr)
    if route is None or ask is None:  # no second opinion to ask: the route, if any, stays
        return OperatingPoint(threshold, route, served)
    while threshold < route:  # each step asks messages no step asked before, so it ends
        added = np.flatnonzero((first >= threshold) & (first < route))
        route = threshold
        served[added] = ask(added)
        threshold = metrics.threshold_at_fpr(served, fpr)
    return OperatingPoint(threshold, route, served)


def calibrate(clf: Classifier, texts: list[str], fpr: float, source: str,
              log: Callable[[str], None] = lambda m: None) -> Classifier:
    """A copy of `clf` whose threshold flags at most `fpr` of `texts`, with the calibration on its card.
    The threshold is on the score served, the second opinion's where it was asked. Where the route
    moves, the texts are scored again as the new head serves them (the first encoder's batches differ
    in the last bits; the second's vectors are kept, as its batches do not), and the threshold is set
    on those scores."""
    check_rows(len(texts), fpr)
    if clf.second is None:
        before, first = scored(clf, texts, log)
        return calibrated(clf, first, before, operating_point(first, before, None, None, fpr), fpr, source)
    e5 = _remembering(clf.encode_second)

    def at(route: float) -> Classifier:
        return Classifier(clf.head, clf.encode, SecondOpinion(clf.second.net, route), e5, clf.neighbours)

    before, first = scored(at(clf.second.route), texts, log)

    def ask(idx: np.ndarray) -> np.ndarray:
        return unsafe_scores(at(0.0), [texts[i] for i in idx], lambda m: log(f"second opinion: {m}"))
    point = operating_point(first, before, clf.second.route, ask, fpr)
    if point.route != clf.second.route:
        served = unsafe_scores(at(point.route), texts, lambda m: log(f"at the new route: {m}"))
        threshold = metrics.threshold_at_fpr(served, fpr)
        # the last bits may put the threshold a hair (about 1e-7) under the route: the route follows it
        point = OperatingPoint(threshold, min(point.route, threshold), served)
    return calibrated(clf, first, before, point, fpr, source)


def _remembering(encode: Callable[[list[str]], np.ndarray]) -> Callable[[list[str]], np.ndarray]:
    """`encode`, each window encoded once: the second encoder's vector of a window is the same in any batch."""
    seen: dict[str, np.ndarray] = {}

    def remembered(windows: list[str]) -> np.ndarray:
        if missing := [w for w in dict.fromkeys(windows) if w not in seen]:
            seen.update(zip(missing, encode(missing)))
        return np.stack([seen[w] for w in windows]) if windows else encode([])
    return remembered


def check_rows(rows: int, fpr: float) -> None:
    check_fpr(fpr)
    if rows < min_rows(fpr):
        raise GuardtuneError(f"{rows} messages cannot set a {fpr:.2%} threshold: it needs at least "
                             f"{min_rows(fpr)}, so that {FLAGS_NEEDED} of them land above it")


def calibrated(clf: Classifier, first: np.ndarray, before: np.ndarray, point: OperatingPoint, fpr: float,
               source: str) -> Classifier:
    """`clf` at `point`, found on messages whose first-head scores are `first` and served scores were
    `before`. The card's test table moves under `calibration`: its shares flagged were at the old
    threshold and route."""
    check_rows(len(first), fpr)
    head = clf.head
    card = {k: v for k, v in head.card.items() if k != "test"}
    card["calibration"] = {
        "source": source, "rows": len(first), "fpr": fpr, "threshold_before": round(head.threshold, 6),
        "flagged_before": _share(before >= head.threshold), "flagged": _share(point.served >= point.threshold),
        "test_before": head.card.get("test")}
    opinion = clf.second
    if opinion is not None:
        card["calibration"] |= {"route_before": opinion.route, "routed_before": _share(first >= opinion.route),
                                "routed": _share(first >= point.route)}
        opinion = SecondOpinion(opinion.net, point.route)
        card["second"] = {**card["second"], "route": point.route}  # unrounded: it may be the threshold itself
    return Classifier(Head(head.weights, head.biases, point.threshold, card), clf.encode, opinion, clf.encode_second,
                      clf.neighbours)


def save(clf: Classifier, out: Path) -> dict:
    """Written beside `out`, then moved in, the card last: a failed write leaves the old head whole."""
    out = out.resolve()  # "." has no name to put the temporary one beside
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        card = clf.save(tmp)
        out.mkdir(parents=True, exist_ok=True)
        for name in [WEIGHTS, *([SECOND] if clf.second else []), *([NEIGHBOURS] if clf.neighbours else []), CARD]:
            os.replace(tmp / name, out / name)
    except OSError as e:
        raise GuardtuneError(f"{out}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return card


def describe(card: dict) -> str:
    c = card["calibration"]
    line = (f"threshold {c['threshold_before']:.4f} -> {card['threshold']:.4f} on {c['rows']} messages of "
            f"{c['source']}: flagged {c['flagged_before']:.2%} -> {c['flagged']:.2%} (budget {c['fpr']:.2%})")
    if "route_before" in c and c["route_before"] != card["second"]["route"]:
        line += (f"; the second opinion's route {c['route_before']:.4f} -> {card['second']['route']:.4f}, so it "
                 f"reads {c['routed_before']:.2%} -> {c['routed']:.2%} of them")
    return line


def _share(mask: np.ndarray) -> float:
    return round(float(mask.mean()), 5)
