"""Read JSONL rows in alpaca or OpenAI-messages shape into one normalised conversation form.

A bad row is never dropped in silence: it is an error naming file:line, or, with skip_bad_rows,
it is counted and reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from kernel.errors import GuardtuneError

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


class BadRow(ValueError):
    pass


@dataclass
class ReadResult:
    conversations: list[list[Message]]
    bad_rows: list[str] = field(default_factory=list)  # "file:line: reason"


def read_jsonl(path: str | Path, *, skip_bad_rows: bool = False) -> ReadResult:
    return ReadResult(*read_all(path, normalise_row, skip_bad_rows=skip_bad_rows))


def read_all(path: str | Path, parse, *, skip_bad_rows: bool = False, what: str = "rows") -> tuple[list, list[str]]:
    """(every parsed row, bad rows skipped); a file with no usable row is an error."""
    rows: list = []
    bad: list[str] = []
    for _, row in iter_rows(path, parse, skip_bad_rows=skip_bad_rows, bad_rows=bad):
        rows.append(row)
    if not rows:
        raise GuardtuneError(f"data {path}: no usable {what}")
    return rows, bad


def iter_rows(path: str | Path, parse=None, *, skip_bad_rows: bool = False,
              bad_rows: list[str] | None = None) -> Iterator[tuple[int, object]]:
    """Stream (row index, parsed row), one line at a time, so memory does not grow with the file.

    The index counts every row, bad ones included, so that a split by index is stable. `.txt` files
    hold raw text (stage pt): one row per blank-line-separated block, not JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise GuardtuneError(f"data {path}: no such file")
    parse = parse or normalise_row
    txt = path.suffix == ".txt"  # once, not per row: Path.suffix is a measurable share of reading
    for index, (lineno, raw) in enumerate(_raw_rows(path)):
        try:
            if txt:
                yield index, parse(raw)
                continue
            if not raw.strip():
                raise BadRow("empty line")
            yield index, parse(json.loads(raw))
        except (json.JSONDecodeError, BadRow) as exc:
            reason = f"invalid JSON ({exc.msg})" if isinstance(exc, json.JSONDecodeError) else str(exc)
            where = f"{path}:{lineno}: {reason}"
            if not skip_bad_rows:
                raise GuardtuneError(f"{where} (use skip_bad_rows=true to count and skip bad rows)") from None
            if bad_rows is not None:
                bad_rows.append(where)


def count_rows(path: str | Path) -> int:
    return sum(1 for _ in _raw_rows(Path(path)))


def _raw_rows(path: Path) -> Iterator[tuple[int, str]]:
    """(first line number, text) per row: a line of JSONL, or a blank-line-separated block of a .txt file."""
    block: list[str] = []
    start = 1
    txt = path.suffix == ".txt"
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise GuardtuneError(f"{path}:{lineno}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not txt:
                yield lineno, text
            elif text.strip():
                if not block:
                    start = lineno
                block.append(text)
            elif block:
                yield start, "".join(block).strip()
                block = []
    if block:
        yield start, "".join(block).strip()


def text_row(row: object) -> str:
    """Stage pt: a JSONL row with a `text` field, or a block of a .txt file."""
    if isinstance(row, str):
        return row
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise BadRow("stage pt reads raw text: each row needs a 'text' string (or use a .txt file)")
    if not row["text"].strip():
        raise BadRow("empty 'text'")
    return row["text"]


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


def utf8_lines(path: Path, what: str) -> list[str]:
    """A small text file's lines; a missing or non-UTF-8 file is a one-line error naming `what`."""
    if not path.is_file():
        raise GuardtuneError(f"{what} {path}: no such file")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise GuardtuneError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None


def checked_turns(raw: list, label: str = "message") -> tuple[list[Message], list[str]]:
    """Validated messages and their non-system roles: known roles, non-empty text, a system turn only
    first. Callers add their rules for the first and last turn, then check_alternation."""
    out: list[Message] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise BadRow(f"{label} {i} is not an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise BadRow(f"{label} {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str) or not content.strip():
            raise BadRow(f"{label} {i} ({role}) has empty or non-string content")
        if role == "system" and i != 0:
            raise BadRow(f"{label} {i}: a system turn may only come first")
        out.append({"role": role, "content": content})
    return out, [m["role"] for m in out if m["role"] != "system"]


def check_alternation(turns: list[str], prefix: str = "") -> None:
    for a, b in zip(turns, turns[1:]):
        if a == b:
            raise BadRow(f"{prefix}two {a} turns in a row: user and assistant must alternate")


def _messages(raw: object) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise BadRow("'messages' must be a non-empty list")
    out, turns = checked_turns(raw)
    if not turns or turns[0] != "user":
        raise BadRow("conversation must start with a user turn (after an optional system turn)")
    check_alternation(turns)
    if turns[-1] != "assistant":
        raise BadRow("conversation must end with an assistant turn")
    return out
