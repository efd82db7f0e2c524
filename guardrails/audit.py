"""The audit store: exactly one record per guarded chat request, keyed by request id.

SQLite in WAL mode with synchronous=FULL, so a record that `write()` has returned for is on disk
and survives a `kill -9` of the server right after. Filterable fields live in indexed columns; the
whole record is kept as JSON next to them. Several replicas share one PostgreSQL store instead
(`guardrails/stores/postgres.py`, chosen by a `postgresql://` URL; `guardrails.stores.open_audit_store`).

A record, as serving writes it (every key but request_id is optional; what is given is stored):

    {"request_id": "chatcmpl-...",        # required, the primary key
     "ts": 1717000000.0,                  # unix seconds; filled with now when missing
     "task": "sales",                     # task name (or the base model id)
     "session_id": "abc" | None,
     "stage": "greeting" | None,          # dialogue stage
     "outcome": "passed",                 # passed | blocked | redacted | script | fallback | monitor
     "blocked_by": "injection" | None,    # optional; else taken from input.blocked_by
     "input": {"blocked_by": ..., "verdicts": [...], "latency_ms": ...},   # moderation report
     "retrieved": ["doc-1#3", ...],       # chunk ids given to the model
     "prompt": [{"role": ..., "content": ...}, ...],   # the messages the model saw
     "raw_generation": "..." | None,      # what the model wrote; None when blocked before it
     "sent": "...",                       # what the client got
     "script": {"id": ..., "score": ...} | None,
     "fallback": {"stage": ..., "variant": ...} | None,
     "latency_ms": {"input": .., "retrieval": .., "generation": .., "compliance": .., "total": ..}}

Reading: `query` (one page, newest first) and `count` take the same filters (QUERY_FILTERS), so
`audit_page` pairs them into an offset-paged listing with a next-page offset. Retention: `purge`
deletes records older than a cut-off, a batch at a time (`guardtune audit purge --older-than-days N`).

`export_badcases` turns fallback/blocked records into a preference dataset in TRL's
conversational form (prompt messages, chosen = the sent reply, rejected = the raw generation).
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

from kernel.errors import GuardtuneError

DEFAULT_DB = Path("audit/audit.db")
OUTCOMES = ("passed", "blocked", "redacted", "script", "fallback", "monitor")
CHAT_ROLES = ("system", "user", "assistant")
QUERY_FILTERS = ("task", "outcome", "session_id", "since")  # what query, count and audit_page all accept
PURGE_BATCH = 1000  # rows per purge transaction: serving's writes never wait behind a whole purge

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    request_id TEXT PRIMARY KEY,
    ts         REAL NOT NULL,
    task       TEXT,
    session_id TEXT,
    stage      TEXT,
    outcome    TEXT,
    blocked_by TEXT,
    record     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts);
CREATE INDEX IF NOT EXISTS audit_task_ts ON audit (task, ts);
CREATE INDEX IF NOT EXISTS audit_outcome_ts ON audit (outcome, ts);
CREATE INDEX IF NOT EXISTS audit_session_ts ON audit (session_id, ts);
"""


class AuditBackend(Protocol):
    """What serving, the CLI and `export_badcases` use; SQLite (AuditStore) and PostgreSQL implement it.

    `query` and `count` take the same keyword filters (QUERY_FILTERS; all given ones must match):
    `count(**f)` is the total that paging `query(**f, limit=L, offset=O)` walks through, newest first
    (ts, then request_id, descending), so offsets 0, L, 2L, ... cover every matching record once while
    nothing is written meanwhile. A negative limit means no limit and a negative offset 0, on both backends.
    """

    def write(self, record: dict[str, Any]) -> None: ...
    def get(self, request_id: str) -> dict[str, Any] | None: ...
    def query(self, *, task: str | None = None, outcome: str | Iterable[str] | None = None,
              session_id: str | None = None, since: float | None = None,
              limit: int = 100, offset: int = 0) -> list[dict[str, Any]]: ...
    def count(self, *, task: str | None = None, outcome: str | Iterable[str] | None = None,
              session_id: str | None = None, since: float | None = None) -> int: ...
    def iter_records(self, *, outcome: str | Iterable[str] | None = None, since: float | None = None,
                     page: int = 500) -> Iterator[dict[str, Any]]: ...
    def purge(self, before_ts: float, *, batch: int = PURGE_BATCH) -> int: ...
    def close(self) -> None: ...


class AuditStore:
    """Thread-safe: one connection behind a lock (SQLite serialises writers anyway; records are small)."""

    def __init__(self, path: str | Path = DEFAULT_DB):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: autocommit, so each write is its own durable transaction.
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise GuardtuneError(f"audit db {self.path}: {exc}") from None

    def write(self, record: dict[str, Any]) -> None:
        """Store one record; a second write with the same request_id replaces it (retries are idempotent)."""
        row = audit_row(record)
        with self._lock:
            self._db().execute("INSERT OR REPLACE INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)

    def get(self, request_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db().execute("SELECT record FROM audit WHERE request_id = ?", (request_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def query(self, *, task: str | None = None, outcome: str | Iterable[str] | None = None,
              session_id: str | None = None, since: float | None = None,
              limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Records matching every given filter, newest first. `outcome` may be one value or several.

        Same filters as `count` (QUERY_FILTERS); `offset` skips that many of the newest matches.
        """
        where, params = _where(task, outcome, session_id, since)
        sql = f"SELECT record FROM audit{where} ORDER BY ts DESC, request_id DESC LIMIT ? OFFSET ?"
        with self._lock:
            rows = self._db().execute(sql, (*params, int(limit), int(offset))).fetchall()
        return [json.loads(r[0]) for r in rows]

    def count(self, *, task: str | None = None, outcome: str | Iterable[str] | None = None,
              session_id: str | None = None, since: float | None = None) -> int:
        """How many records match; the same filters as `query`, so it is the total its pages walk through."""
        where, params = _where(task, outcome, session_id, since)
        with self._lock:
            return self._db().execute(f"SELECT COUNT(*) FROM audit{where}", params).fetchone()[0]

    def iter_records(self, *, outcome: str | Iterable[str] | None = None, since: float | None = None,
                     page: int = 500) -> Iterator[dict[str, Any]]:
        """All matching records oldest first, a page at a time (keyset paging, so writes meanwhile are safe)."""
        where, params = _where(None, outcome, None, since)
        key: tuple[float, str] = (float("-inf"), "")
        while True:
            cond = f"{where} AND" if where else " WHERE"
            sql = (f"SELECT ts, request_id, record FROM audit{cond} (ts, request_id) > (?, ?) "
                   "ORDER BY ts, request_id LIMIT ?")
            with self._lock:
                rows = self._db().execute(sql, (*params, *key, page)).fetchall()
            for _, _, blob in rows:
                yield json.loads(blob)
            if len(rows) < page:
                return
            key = (rows[-1][0], rows[-1][1])

    def purge(self, before_ts: float, *, batch: int = PURGE_BATCH) -> int:
        """Delete the records with ts < before_ts (unix seconds); returns how many were deleted.

        A batch at a time, oldest first through the ts index, each batch its own transaction with the
        lock let go in between: writers (threads here, other processes through SQLite's busy wait)
        wait for one batch at most. Records written meanwhile with a newer ts are never touched.
        """
        cutoff, batch = check_purge(before_ts, batch)
        total = 0
        while deleted := self._delete_batch(cutoff, batch):
            total += deleted
        return total

    # rowid: the ts index holds it, so the inner select never reads the table itself.
    _PURGE_SQL = "DELETE FROM audit WHERE rowid IN (SELECT rowid FROM audit WHERE ts < ? ORDER BY ts LIMIT ?)"

    def _delete_batch(self, cutoff: float, batch: int) -> int:
        try:
            with self._lock:
                return self._db().execute(self._PURGE_SQL, (cutoff, batch)).rowcount
        except sqlite3.Error as exc:  # e.g. locked past the busy timeout: one line, not a traceback
            raise GuardtuneError(f"audit db {self.path}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> AuditStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise GuardtuneError(f"audit db {self.path}: store is closed")
        return self._conn


def audit_row(record: dict[str, Any]) -> tuple:
    """The validated column values of one record (every backend stores exactly these)."""
    rid = record.get("request_id") if isinstance(record, dict) else None
    if not isinstance(rid, str) or not rid:
        raise GuardtuneError("audit record needs a non-empty string 'request_id'")
    record = dict(record)
    record.setdefault("ts", time.time())
    if not isinstance(record["ts"], (int, float)) or isinstance(record["ts"], bool):
        raise GuardtuneError(f"audit record {rid}: 'ts' must be unix seconds (a number)")
    try:
        blob = json.dumps(record, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise GuardtuneError(f"audit record {rid}: not JSON-serialisable ({exc})") from None
    blocked_by = record.get("blocked_by")
    if blocked_by is None and isinstance(record.get("input"), dict):
        blocked_by = record["input"].get("blocked_by")
    return (rid, float(record["ts"]), _text(record.get("task")), _text(record.get("session_id")),
            _text(record.get("stage")), _text(record.get("outcome")), _text(blocked_by), blob)


def check_purge(before_ts: Any, batch: Any) -> tuple[float, int]:
    """The validated purge arguments (every backend checks exactly these)."""
    # NaN would delete nothing on SQLite (it binds as NULL) and everything on PostgreSQL (NaN sorts last).
    if not isinstance(before_ts, (int, float)) or isinstance(before_ts, bool) or math.isnan(before_ts):
        raise GuardtuneError(f"audit purge: before_ts must be unix seconds (a number), got {before_ts!r}")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise GuardtuneError(f"audit purge: batch must be a positive integer, got {batch!r}")
    return float(before_ts), batch


def audit_page(store: AuditBackend, *, offset: int = 0, limit: int = 100,
               **filters: Any) -> dict[str, Any]:
    """One page of records, newest first, with what a client needs to ask for the next one:

        {"records": [...], "count": n, "total": matching records, "next_offset": offset + n or None}

    `filters` are QUERY_FILTERS (task, outcome, session_id, since), passed to `query` and `count` alike.
    next_offset is None on the last page. Offsets shift when records are written or purged between
    calls (newest first: new records push older ones to later pages), so a listing taken while
    serving writes may repeat a record across pages; that is the price of stateless offsets.
    """
    unknown = set(filters) - set(QUERY_FILTERS)
    if unknown:
        raise GuardtuneError(f"audit page: unknown filter(s) {', '.join(sorted(unknown))}; "
                             f"use {', '.join(QUERY_FILTERS)}")
    if not _whole(offset) or offset < 0 or not _whole(limit) or limit < 1:
        raise GuardtuneError(f"audit page: need offset >= 0 and limit >= 1, got offset={offset!r} limit={limit!r}")
    records = store.query(**filters, limit=limit, offset=offset)
    total = store.count(**filters)
    return {"records": records, "count": len(records), "total": total,
            "next_offset": next_offset(offset, len(records), limit, total)}


def next_offset(offset: int, count: int, limit: int, total: int) -> int | None:
    """The offset of the page after one of `count` records at `offset`, or None when it was the last."""
    # A short page means the end was reached, whatever a count taken a moment later says.
    return offset + count if count == limit and offset + count < total else None


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _where(task: str | None, outcome: str | Iterable[str] | None, session_id: str | None,
           since: float | None, mark: str = "?") -> tuple[str, list[Any]]:
    clauses, params = [], []
    for column, value in (("task", task), ("session_id", session_id)):
        if value is not None:
            clauses.append(f"{column} = {mark}")
            params.append(value)
    if outcome is not None:
        values = [outcome] if isinstance(outcome, str) else list(outcome)
        clauses.append(f"outcome IN ({', '.join([mark] * len(values))})")
        params += values
    if since is not None:
        clauses.append(f"ts >= {mark}")
        params.append(float(since))
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


# --- bad cases -> preference data ---------------------------------------------------------------

def export_badcases(store: AuditBackend, out_path: str | Path, *,
                    outcomes: Iterable[str] = ("fallback", "blocked"), since: float | None = None,
                    skipped: list[str] | None = None) -> int:
    """Write records that fell back or were flagged as TRL conversational preference rows (JSONL).

    One row per record whose raw generation and sent reply both exist and differ:
    {"prompt": [messages up to the last user turn], "chosen": [{"role": "assistant", "content": sent}],
     "rejected": [{"role": "assistant", "content": raw_generation}], "meta": {...}}.
    Records that cannot make a row (e.g. blocked before the model) are not dropped in silence:
    "request_id: reason" is appended to `skipped`. Returns the number of rows written.
    """
    outcomes = [outcomes] if isinstance(outcomes, str) else list(outcomes)
    out_path = Path(out_path)
    rows: list[str] = []
    for record in store.iter_records(outcome=outcomes, since=since):
        row, reason = _preference_row(record)
        if row is None:
            if skipped is not None:
                skipped.append(f"{record.get('request_id')}: {reason}")
            continue
        rows.append(json.dumps(row, ensure_ascii=False) + "\n")
    _write_atomic(out_path, "".join(rows))
    return len(rows)


def _preference_row(record: dict[str, Any]) -> tuple[dict | None, str]:
    raw, sent = record.get("raw_generation"), record.get("sent")
    if not isinstance(raw, str) or not raw.strip():
        return None, "no raw generation"
    if not isinstance(sent, str) or not sent.strip():
        return None, "no sent reply"
    if raw.strip() == sent.strip():
        return None, "sent reply equals raw generation"
    prompt = _prompt_messages(record.get("prompt"))
    if prompt is None:
        return None, "no usable prompt (needs role/content messages with a user turn)"
    meta = {k: record.get(k) for k in ("request_id", "task", "outcome", "stage")}
    return {"prompt": prompt,
            "chosen": [{"role": "assistant", "content": sent}],
            "rejected": [{"role": "assistant", "content": raw}],
            "meta": meta}, ""


def _prompt_messages(raw: Any) -> list[dict[str, str]] | None:
    """The messages up to and including the last user turn, as plain role/content dicts."""
    if not isinstance(raw, list):
        return None
    messages: list[dict[str, str]] = []
    for m in raw:
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            return None
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            return None
        messages.append({"role": m["role"], "content": content})
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    return None if last_user is None else messages[: last_user + 1]


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a dataset should read like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
