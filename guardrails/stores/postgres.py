"""The PostgreSQL backend of the session and audit stores, so several server replicas share both.

Same interface and behaviour as the SQLite stores (`sqlite.py` beside this file): the same columns,
the same validation (`guardrails.audit.audit_row`), the same order and filters. Differences that
matter to an operator:
- Durability: every write is its own autocommitted transaction with `synchronous_commit=on`, so a
  write that has returned is in the server's flushed WAL (and on synchronous standbys, if any).
- Tables are `guardtune_audit` and `guardtune_sessions`, created on first use under an advisory
  lock, so replicas that start together do not race. The user needs CREATE on the schema once.
- Text ids compare bytewise (`COLLATE "C"`), as SQLite does, so "newest first" ties and keyset
  paging order the same whatever the database's locale.
- PostgreSQL text cannot hold NUL; a NUL in an indexed value (e.g. a client's session id) is
  stored as U+FFFD, in writes and in filters alike. The JSON record keeps it escaped, unchanged.
- A lost connection (server restart, failover) is reopened once and the statement retried; every
  statement here is idempotent (upserts, reads, and purge batches: deleting what is gone is a no-op).
- `purge` deletes in batches whose rows are locked with SKIP LOCKED: a row a replica is rewriting
  right now is left for the next purge instead of making either side wait (or deadlock).

The URL is libpq's (`postgresql://user@host:5432/db?sslmode=require`); anything it leaves out comes
from the PG* environment variables (PGHOST, PGUSER, PGPASSWORD, ...), which keeps passwords out of
config files. Messages never show the password.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

from guardrails.audit import PURGE_BATCH, audit_row, check_purge, keyset_records, where_clause
from guardrails.stores.targets import redact
from kernel.errors import GuardtuneError

T = TypeVar("T")
_SCHEMA_LOCK = 0x67746E64  # "gtnd": serialises CREATE TABLE IF NOT EXISTS across replicas

AUDIT_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS guardtune_audit (
        request_id TEXT COLLATE "C" PRIMARY KEY,
        ts         DOUBLE PRECISION NOT NULL,
        task       TEXT COLLATE "C",
        session_id TEXT COLLATE "C",
        stage      TEXT COLLATE "C",
        outcome    TEXT COLLATE "C",
        blocked_by TEXT COLLATE "C",
        record     TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS guardtune_audit_ts ON guardtune_audit (ts)",
    "CREATE INDEX IF NOT EXISTS guardtune_audit_task_ts ON guardtune_audit (task, ts)",
    "CREATE INDEX IF NOT EXISTS guardtune_audit_outcome_ts ON guardtune_audit (outcome, ts)",
    "CREATE INDEX IF NOT EXISTS guardtune_audit_session_ts ON guardtune_audit (session_id, ts)",
)
SESSIONS_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS guardtune_sessions (
        id      TEXT COLLATE "C" PRIMARY KEY,
        stage   TEXT,
        updated DOUBLE PRECISION NOT NULL)""",
)


def _nul(value: Any) -> Any:
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


class Connection:
    """One autocommit connection behind a lock, reopened once when the server drops it."""

    def __init__(self, url: str, what: str, schema: tuple[str, ...]):
        try:
            import psycopg
        except ImportError:
            raise GuardtuneError(f"{what} {redact(url)}: PostgreSQL needs psycopg "
                                 "(pip install 'psycopg[binary]', see requirements/runtime.txt)") from None
        self._psycopg, self.url, self.label = psycopg, url, f"{what} {redact(url)}"
        self._schema = schema
        self._lock = threading.Lock()
        self._conn = self._connect()

    def _connect(self):
        kwargs: dict[str, Any] = {}
        if "connect_timeout" not in self.url and "PGCONNECT_TIMEOUT" not in os.environ:
            kwargs["connect_timeout"] = 10  # a wrong host fails start-up instead of hanging it
        try:
            conn = self._psycopg.connect(self.url, autocommit=True, **kwargs)
            # Acknowledged means flushed: a server configured with synchronous_commit=off must not weaken it.
            conn.execute("SET synchronous_commit TO on")
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                for statement in self._schema:
                    conn.execute(statement)
            return conn
        except self._psycopg.Error as exc:
            raise GuardtuneError(f"{self.label}: {_one_line(exc)}") from None

    def run(self, fn: Callable[[Any], T]) -> T:
        with self._lock:
            if self._conn is None:
                raise GuardtuneError(f"{self.label}: store is closed")
            try:
                return fn(self._conn)
            except self._psycopg.OperationalError as exc:
                if not self._conn.broken and not self._conn.closed:
                    raise GuardtuneError(f"{self.label}: {_one_line(exc)}") from None
            except self._psycopg.Error as exc:
                raise GuardtuneError(f"{self.label}: {_one_line(exc)}") from None
            # The connection was lost (server restart, failover): reconnect once and retry.
            self._conn = self._connect()
            try:
                return fn(self._conn)
            except self._psycopg.Error as exc:
                raise GuardtuneError(f"{self.label}: {_one_line(exc)}") from None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class PostgresSessions:
    """`SessionStore` on PostgreSQL: a stage set by one replica is what every other replica reads."""

    def __init__(self, url: str):
        self._c = Connection(url, "sessions db", SESSIONS_SCHEMA)

    def get_stage(self, session_id: str) -> str | None:
        row = self._c.run(lambda c: c.execute("SELECT stage FROM guardtune_sessions WHERE id = %s",
                                              (_nul(session_id),)).fetchone())
        return row[0] if row else None

    def set_stage(self, session_id: str, stage: str) -> None:
        self._c.run(lambda c: c.execute(
            "INSERT INTO guardtune_sessions (id, stage, updated) VALUES (%s, %s, %s) "
            "ON CONFLICT (id) DO UPDATE SET stage = EXCLUDED.stage, updated = EXCLUDED.updated",
            (_nul(session_id), _nul(stage), time.time())))

    def close(self) -> None:
        self._c.close()


class PostgresAuditStore:
    """`AuditBackend` on PostgreSQL, with the SQLite AuditStore's semantics (see sqlite.py)."""

    def __init__(self, url: str):
        self.path = redact(url)  # what messages name, like AuditStore.path
        self._c = Connection(url, "audit db", AUDIT_SCHEMA)

    def write(self, record: dict[str, Any]) -> None:
        """Store one record; a second write with the same request_id replaces it (retries are idempotent)."""
        row = tuple(_nul(v) for v in audit_row(record))
        self._c.run(lambda c: c.execute(
            "INSERT INTO guardtune_audit (request_id, ts, task, session_id, stage, outcome, blocked_by, record) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (request_id) DO UPDATE SET "
            "ts = EXCLUDED.ts, task = EXCLUDED.task, session_id = EXCLUDED.session_id, stage = EXCLUDED.stage, "
            "outcome = EXCLUDED.outcome, blocked_by = EXCLUDED.blocked_by, record = EXCLUDED.record", row))

    def get(self, request_id: str) -> dict[str, Any] | None:
        row = self._c.run(lambda c: c.execute("SELECT record FROM guardtune_audit WHERE request_id = %s",
                                              (_nul(request_id),)).fetchone())
        return json.loads(row[0]) if row else None

    def query(self, *, task: str | None = None, outcome: str | Iterable[str] | None = None,
              session_id: str | None = None, since: float | None = None,
              limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Records matching every given filter, newest first. `outcome` may be one value or several.

        Same filters as `count` (guardrails.audit.QUERY_FILTERS); `offset` skips that many of the newest matches.
        """
        where, params = self._where(task, outcome, session_id, since)
        # SQLite reads a negative LIMIT as "no limit" and a negative OFFSET as 0; PostgreSQL refuses both.
        lim = None if int(limit) < 0 else int(limit)
        sql = f"SELECT record FROM guardtune_audit{where} ORDER BY ts DESC, request_id DESC LIMIT %s OFFSET %s"
        rows = self._c.run(lambda c: c.execute(sql, (*params, lim, max(0, int(offset)))).fetchall())
        return [json.loads(r[0]) for r in rows]

    def count(self, *, task: str | None = None, outcome: str | Iterable[str] | None = None,
              session_id: str | None = None, since: float | None = None) -> int:
        """How many records match; the same filters as `query`, so it is the total its pages walk through."""
        where, params = self._where(task, outcome, session_id, since)
        return self._c.run(lambda c: c.execute(f"SELECT COUNT(*) FROM guardtune_audit{where}",
                                               params).fetchone()[0])

    def iter_records(self, *, outcome: str | Iterable[str] | None = None, since: float | None = None,
                     page: int = 500) -> Iterator[dict[str, Any]]:
        """All matching records oldest first, a page at a time (keyset paging, so writes meanwhile are safe)."""
        where, params = self._where(None, outcome, None, since, after_key=True)
        sql = f"SELECT ts, request_id, record FROM guardtune_audit{where} ORDER BY ts, request_id LIMIT %s"
        return keyset_records(lambda key: self._c.run(lambda c: c.execute(sql, (*params, *key, page)).fetchall()),
                              page)

    def purge(self, before_ts: float, *, batch: int = PURGE_BATCH) -> int:
        """Delete the records with ts < before_ts (unix seconds); returns how many were deleted.

        A batch at a time, oldest first through the ts index, each batch its own short transaction,
        so replicas writing meanwhile are never held up by a whole purge, nor are other purges.
        """
        cutoff, batch = check_purge(before_ts, batch)
        total = 0
        while deleted := self._c.run(lambda c: c.execute(self._PURGE_SQL, (cutoff, cutoff, batch)).rowcount):
            total += deleted
        return total

    # FOR UPDATE rechecks `ts <` on the newest version of a row rewritten meanwhile and holds it until
    # the delete, so a record whose retry moved it past the cut-off survives; the outer `ts <` says so too.
    _PURGE_SQL = ("DELETE FROM guardtune_audit WHERE ts < %s AND request_id IN (SELECT request_id FROM guardtune_audit "
                  "WHERE ts < %s ORDER BY ts LIMIT %s FOR UPDATE SKIP LOCKED)")

    @staticmethod
    def _where(task, outcome, session_id, since, after_key: bool = False) -> tuple[str, list[Any]]:
        where, params = where_clause(task, outcome, session_id, since, mark="%s", after_key=after_key)
        return where, [_nul(p) for p in params]

    def close(self) -> None:
        self._c.close()

    def __enter__(self) -> PostgresAuditStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
