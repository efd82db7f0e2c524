"""Bad cases -> preference pairs: what `guardtune badcases export` writes for `train stage=dpo`.

Each audit record gives at most one row in TRL's conversational preference form, the form
`training/data/preferences.py` reads:

    {"prompt": [messages up to the last user turn], "chosen": [{"role": "assistant", "content": ...}],
     "rejected": [{"role": "assistant", "content": ...}],
     "meta": {"request_id": ..., "task": ..., "outcome": ..., "stage": ...}}

The rules, by the record's outcome (guardrails/outcomes.py):
- script, fallback, leak: the guard replaced the reply. chosen = what was sent (the approved script,
  the stage's fallback, the leak reply); rejected = the raw generation.
- monitor_script, monitor_fallback: the raw reply went out; compliance only recorded what it would
  have sent. chosen = that text (the record's `script.text` / `fallback.text`); rejected = the raw
  generation. Records written before the audit kept that text cannot make a pair.
- blocked: moderation refused the request before the model ran, so the refusal that was sent is the
  chosen side and only a generation for that prompt could be the rejected one. Serving never generates
  for a blocked request: its records are skipped ("blocked before the model: no generation"); a record
  that does hold a raw generation (written by another tool) makes a pair.
- passed, redacted: the reply went out as the model wrote it: nothing to prefer.
- invalid, monitor_invalid: a JSON or tool-call reply failed its schema; there is no approved text to
  prefer, so no pair.
- error_<status>: the request failed: no reply to prefer.

Every text comes from the record as the audit store holds it (serving PII-redacts a record before it
is written) and passes the PII scanner once more, so a record written without redaction brings no PII
in either; nothing is looked up elsewhere (not the script store), so nothing redacted comes back.
A pair also has to be one `train stage=dpo` accepts (the prompt's turns alternate and end with the
user), or it is skipped with the reason. Records are read oldest first ((ts, request_id)); a pair
identical to an earlier one is skipped as a duplicate: the same store gives the same file, byte for byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from guardrails import outcomes as vocab
from guardrails.audit import AuditBackend
from guardrails.privacy import redact_deep
from guardrails.scanners.pii import PII
from kernel.fsutil import atomic_write_text

# The outcomes a pair can come from, in the vocabulary's order: the default of `badcases export`.
PAIRED = (vocab.BLOCKED, vocab.SCRIPT, vocab.FALLBACK, vocab.MONITOR_SCRIPT, vocab.MONITOR_FALLBACK, vocab.LEAK)
MONITORED = {vocab.MONITOR_SCRIPT: "script", vocab.MONITOR_FALLBACK: "fallback"}  # outcome -> record key with its text
PROMPT_ROLES = ("system", "user", "assistant")

# Why a record made no pair (the export's summary counts records by these).
BLOCKED_BEFORE_MODEL = "blocked before the model: no generation"
NO_RAW = "no raw generation"
NO_SENT = "no sent reply"
NO_COMPLIANCE_TEXT = "no compliance text recorded"
AS_WRITTEN = "reply went out as written: nothing to prefer"
FAILED = "request failed: no reply to prefer"
SAME = "chosen equals rejected: nothing to prefer"
NO_PROMPT = "no usable prompt"  # followed by ": what is wrong"
DUPLICATE = "duplicate of an earlier pair"


@dataclass
class BadcaseExport:
    """What one export did: rows written (per outcome) and the records skipped, in record order."""
    out: Path
    by_outcome: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (request_id, reason)

    @property
    def rows(self) -> int:
        return sum(self.by_outcome.values())

    def reasons(self) -> dict[str, int]:
        """Skipped records per reason, most first (ties by name)."""
        counts: dict[str, int] = {}
        for _, reason in self.skipped:
            counts[reason] = counts.get(reason, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def summary(self) -> str:
        """One line: rows per outcome, skipped records per reason."""
        written = ", ".join(f"{n} {o}" for o, n in sorted(self.by_outcome.items(), key=lambda kv: _order(kv[0])))
        reasons = "; ".join(f"{n} {reason}" for reason, n in self.reasons().items())
        return (f"wrote {self.rows} rows to {self.out}" + (f" ({written})" if written else "")
                + f"; skipped {len(self.skipped)}" + (f" ({reasons})" if reasons else ""))


def export_badcases(store: AuditBackend, out_path: str | Path, *, outcomes: Iterable[str] = PAIRED,
                    since: float | None = None, task: str | None = None) -> BadcaseExport:
    """Write the records of `outcomes` (at or after `since`) as preference rows (JSONL, atomically).

    The pair rules are in this module's docstring. A record that makes no row is not dropped in
    silence: it is in the result's `skipped` with its reason.
    """
    outcomes = vocab.check(outcomes)
    result = BadcaseExport(Path(out_path))
    pii = PII()
    rows: list[str] = []
    seen: set[str] = set()
    for record in store.iter_records(outcome=outcomes, since=since):
        if task is not None and record.get("task") != task:
            continue  # another task's traffic: not a candidate at all
        rid = str(record.get("request_id"))
        row, reason = preference_row(record, pii)
        if row is not None:
            key = json.dumps([row["prompt"], row["chosen"], row["rejected"]], ensure_ascii=False, sort_keys=True)
            row, reason = (None, DUPLICATE) if key in seen else (row, "")
            seen.add(key)
        if row is None:
            result.skipped.append((rid, reason))
            continue
        rows.append(json.dumps(row, ensure_ascii=False) + "\n")
        outcome = row["meta"]["outcome"]
        result.by_outcome[outcome] = result.by_outcome.get(outcome, 0) + 1
    atomic_write_text(result.out, "".join(rows))
    return result


def preference_row(record: dict[str, Any], pii: PII | None = None) -> tuple[dict | None, str]:
    """The record's preference row, or None and why not."""
    chosen, rejected, reason = _sides(record)
    if chosen is None or rejected is None:
        return None, reason
    prompt, why = _prompt_messages(record.get("prompt"))
    if prompt is None:
        return None, f"{NO_PROMPT}: {why}"
    texts = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    texts = redact_deep(texts, pii or PII())  # as the audit store holds it, and never less redacted
    if texts["chosen"].strip() == texts["rejected"].strip():
        return None, SAME
    meta = {k: record.get(k) for k in ("request_id", "task", "outcome", "stage")}
    return {"prompt": texts["prompt"],
            "chosen": [{"role": "assistant", "content": texts["chosen"]}],
            "rejected": [{"role": "assistant", "content": texts["rejected"]}],
            "meta": meta}, ""


def _sides(record: dict[str, Any]) -> tuple[str | None, str | None, str]:
    """(chosen, rejected, why not) by the outcome's rule."""
    outcome = record.get("outcome")
    if outcome in (vocab.PASSED, vocab.REDACTED):
        return None, None, AS_WRITTEN
    if outcome not in PAIRED:  # error_<status>
        return None, None, FAILED
    raw = _text(record.get("raw_generation"))
    if raw is None:
        return None, None, BLOCKED_BEFORE_MODEL if outcome == vocab.BLOCKED else NO_RAW
    if outcome in MONITORED:
        decision = record.get(MONITORED[outcome])
        chosen = _text(decision.get("text")) if isinstance(decision, dict) else None
        return chosen, raw, "" if chosen is not None else NO_COMPLIANCE_TEXT
    sent = _text(record.get("sent"))
    return sent, raw, "" if sent is not None else NO_SENT


def _prompt_messages(raw: Any) -> tuple[list[dict[str, str]] | None, str]:
    """The messages up to and including the last user turn, as `train stage=dpo` accepts them: an optional
    system turn first (a `developer` turn counts as one, as serving renders it), then user and assistant
    turns alternating, each with text. Else None and what is wrong."""
    if not isinstance(raw, list):
        return None, "not a list of messages"
    messages: list[dict[str, str]] = []
    for m in raw:
        role = m.get("role") if isinstance(m, dict) else None
        role = "system" if role == "developer" else role
        if role not in PROMPT_ROLES:
            return None, f"role {role!r}"
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            return None, "non-text content"
        messages.append({"role": role, "content": content})
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        return None, "no user turn"
    messages = messages[: last_user + 1]
    if any(not m["content"].strip() for m in messages):
        return None, "an empty turn"
    turns = [m["role"] for m in messages]
    if "system" in turns[1:]:
        return None, "a system turn after the first"
    turns = [t for t in turns if t != "system"]
    if turns[0] != "user" or any(a == b for a, b in zip(turns, turns[1:])):
        return None, "user and assistant turns do not alternate"
    return messages, ""


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _order(outcome: str) -> int:
    return vocab.OUTCOMES.index(outcome) if outcome in vocab.OUTCOMES else len(vocab.OUTCOMES)
