"""Read JSONL rows in alpaca or OpenAI-messages shape into one normalised conversation form.

A bad row is never dropped in silence: it is an error naming file:line, or, with skip_bad_rows,
it is counted and reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from guardtune.errors import GuardtuneError

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


class BadRow(ValueError):
    pass


@dataclass
class ReadResult:
    conversations: list[list[Message]]
    bad_rows: list[str] = field(default_factory=list)  # "file:line: reason"


def read_jsonl(path: str | Path, *, skip_bad_rows: bool = False) -> ReadResult:
    path = Path(path)
    if not path.is_file():
        raise GuardtuneError(f"data {path}: no such file")
    result = ReadResult(conversations=[])
    with path.open(encoding="utf-8", errors="strict") as fh:
        try:
            lines = list(fh)
        except UnicodeDecodeError as exc:
            raise GuardtuneError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            where = f"{path}:{lineno}: empty line"
            if skip_bad_rows:
                result.bad_rows.append(where)
                continue
            raise GuardtuneError(f"{where} (use skip_bad_rows=true to count and skip bad rows)")
        try:
            result.conversations.append(normalise_row(json.loads(line)))
        except (json.JSONDecodeError, BadRow) as exc:
            reason = f"invalid JSON ({exc.msg})" if isinstance(exc, json.JSONDecodeError) else str(exc)
            where = f"{path}:{lineno}: {reason}"
            if not skip_bad_rows:
                raise GuardtuneError(f"{where} (use skip_bad_rows=true to count and skip bad rows)") from None
            result.bad_rows.append(where)
    if not result.conversations:
        raise GuardtuneError(f"data {path}: no usable rows")
    return result


def normalise_row(row: object) -> list[Message]:
    """One row, either shape, as a list of {role, content} ending in an assistant turn."""
    if not isinstance(row, dict):
        raise BadRow("row is not a JSON object")
    if "messages" in row:
        messages = _messages(row["messages"])
    elif "instruction" in row or "output" in row:
        messages = _alpaca(row)
    else:
        raise BadRow("row has neither 'messages' nor 'instruction'/'output'")
    return messages


def _alpaca(row: dict) -> list[Message]:
    instruction, inp, output = row.get("instruction", ""), row.get("input", "") or "", row.get("output")
    for key, value in (("instruction", instruction), ("input", inp), ("output", output)):
        if not isinstance(value, str):
            raise BadRow(f"alpaca field '{key}' must be a string")
    if not instruction.strip() or not output.strip():
        raise BadRow("alpaca row needs a non-empty 'instruction' and 'output'")
    prompt = f"{instruction}\n\n{inp}" if inp.strip() else instruction
    messages: list[Message] = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        messages.append({"role": "system", "content": row["system"]})
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _messages(raw: object) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise BadRow("'messages' must be a non-empty list")
    out: list[Message] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise BadRow(f"message {i} is not an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise BadRow(f"message {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str) or not content.strip():
            raise BadRow(f"message {i} ({role}) has empty or non-string content")
        if role == "system" and i != 0:
            raise BadRow(f"message {i}: a system turn may only come first")
        out.append({"role": role, "content": content})
    turns = [m["role"] for m in out if m["role"] != "system"]
    if not turns or turns[0] != "user":
        raise BadRow("conversation must start with a user turn (after an optional system turn)")
    for a, b in zip(turns, turns[1:]):
        if a == b:
            raise BadRow(f"two {a} turns in a row: user and assistant must alternate")
    if turns[-1] != "assistant":
        raise BadRow("conversation must end with an assistant turn")
    return out
