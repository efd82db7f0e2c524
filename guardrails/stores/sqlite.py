"""The SQLite backend of the session and audit stores: one server, one file each.

The audit store runs in WAL mode with synchronous=FULL, so a record that `write()` has returned for is
on disk and survives a `kill -9` of the server right after. Filterable fields live in indexed columns
(`guardrails.audit.audit_row`); the whole record is kept as JSON next to them.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from guardrails.audit import DEFAULT_DB, PURGE_BATCH, audit_row, check_purge, keyset_records, where_clause
from kernel.errors import GuardtuneError

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


class AuditStore:
    """`AuditBackend` on SQLite. Thread-safe: one connection behind a lock (SQLite serialises writers
    anyway; records are small)."""

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
        where, params = where_clause(task, outcome, session_id, since)
        sql = f"SELECT record FROM audit{where} ORDER BY ts DESC, request_id DESC LIMIT ? OFFSET ?"
        with self._lock:
            rows = self._db().execute(sql, (*params, int(limit), int(offset))).fetchall()
        return [json.loads(r[0]) for r in rows]

    def count(self, *, task: str | None = None, outcome: str | Iterable[str] | None = None,
              session_id: str | None = None, since: float | None = None) -> int:
        """How many records match; the same filters as `query`, so it is the total its pages walk through."""
        where, params = where_clause(task, outcome, session_id, since)
        with self._lock:
            return self._db().execute(f"SELECT COUNT(*) FROM audit{where}", params).fetchone()[0]

    def iter_records(self, *, outcome: str | Iterable[str] | None = None, since: float | None = None,
                     page: int = 500) -> Iterator[dict[str, Any]]:
        """All matching records oldest first, a page at a time (keyset paging, so writes meanwhile are safe)."""
        where, params = where_clause(None, outcome, None, since, after_key=True)
        sql = f"SELECT ts, request_id, record FROM audit{where} ORDER BY ts, request_id LIMIT ?"

        def fetch(key: tuple[float, str]) -> list[tuple]:
            with self._lock:
                return self._db().execute(sql, (*params, *key, page)).fetchall()

        return keyset_records(fetch, page)

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
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    def __enter__(self) -> AuditStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise GuardtuneError(f"audit db {self.path}: store is closed")
        return self._conn


class SQLiteSessions:
    """`SessionStore` in one SQLite file (WAL), for a single server."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, stage TEXT, updated REAL)")
        self._lock = threading.Lock()

    def get_stage(self, session_id: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT stage FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return row[0] if row else None

    def set_stage(self, session_id: str, stage: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?)", (session_id, stage, time.time()))

    def close(self) -> None:
        with self._lock:
            self._db.close()
