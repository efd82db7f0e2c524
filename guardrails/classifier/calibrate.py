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
from pathlib import Path

import numpy as np

from guardrails.classifier import metrics, second
from guardrails.classifier.head import CARD, WEIGHTS, Head
from guardrails.classifier.model import Classifier
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
    out = []
    for i in range(0, len(texts), BATCH):
        out.append(clf.scores(texts[i:i + BATCH])[:, 0])
        log(f"scored {min(i + BATCH, len(texts))}/{len(texts)}")
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def check_fpr(fpr: float) -> None:
    if not 0 < fpr <= 0.5:
        raise GuardtuneError(f"--fpr must be in (0, 0.5], got {fpr}")


def calibrate(clf: Classifier, texts: list[str], fpr: float, source: str,
              log: Callable[[str], None] = lambda m: None) -> Classifier:
    """A copy of `clf` whose threshold flags at most `fpr` of `texts`, with the calibration on its card.
    The threshold is on the score served, the second opinion's where it was asked."""
    check_rows(len(texts), fpr)
    head = calibrated(clf.head, unsafe_scores(clf, texts, log), fpr, source)
    return Classifier(head, clf.encode, clf.second, clf.encode_second)


def check_rows(rows: int, fpr: float) -> None:
    check_fpr(fpr)
    if rows < min_rows(fpr):
        raise GuardtuneError(f"{rows} messages cannot set a {fpr:.2%} threshold: it needs at least "
                             f"{min_rows(fpr)}, so that {FLAGS_NEEDED} of them land above it")


def calibrated(head: Head, scores: np.ndarray, fpr: float, source: str) -> Head:
    """`calibrate` on messages already scored (their `unsafe` scores). The card's test table moves under
    `calibration`: its shares flagged were at the old threshold."""
    check_rows(len(scores), fpr)
    threshold = metrics.threshold_at_fpr(scores, fpr)
    card = {k: v for k, v in head.card.items() if k != "test"}
    card["calibration"] = {
        "source": source, "rows": len(scores), "fpr": fpr, "threshold_before": round(head.threshold, 6),
        "flagged_before": round(float((scores >= head.threshold).mean()), 5),
        "flagged": round(float((scores >= threshold).mean()), 5), "test_before": head.card.get("test")}
    return Head(head.weights, head.biases, threshold, card)


def save(clf: Classifier, out: Path) -> dict:
    """Written beside `out`, then moved in, the card last: a failed write leaves the old head whole."""
    out = out.resolve()  # "." has no name to put the temporary one beside
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        card = clf.save(tmp)
        out.mkdir(parents=True, exist_ok=True)
        for name in [WEIGHTS, *([second.FILE] if clf.second else []), CARD]:
            os.replace(tmp / name, out / name)
    except OSError as e:
        raise GuardtuneError(f"{out}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return card


def describe(card: dict) -> str:
    c = card["calibration"]
    return (f"threshold {c['threshold_before']:.4f} -> {card['threshold']:.4f} on {c['rows']} messages of "
            f"{c['source']}: flagged {c['flagged_before']:.2%} -> {c['flagged']:.2%} (budget {c['fpr']:.2%})")
