"""Where jobs live: a SQLite file by default; a postgresql:// URL lets several platform instances share it.

A job is one JSON document plus its state and a sequence number for ordering; the store survives a
restart of the platform, which is how a running job is found again and resumed.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

from jobs.model import Job
from kernel.errors import GuardtuneError

SCHEMA = "CREATE TABLE IF NOT EXISTS platform_jobs (id TEXT PRIMARY KEY, seq BIGINT NOT NULL, state TEXT NOT NULL, doc TEXT NOT NULL)"


def open_store(target: str | Path) -> "JobStore":
    if str(target).startswith(("postgresql://", "postgres://")):
        return JobStore(_Postgres(str(target)))
    return JobStore(_SQLite(Path(target)))


class JobStore:
    def __init__(self, db):
        self.db = db
        self.db.execute(SCHEMA)

    def add(self, job: Job) -> None:
        seq = (self.db.one("SELECT COALESCE(MAX(seq), 0) FROM platform_jobs") or [0])[0] + 1
        self.db.execute("INSERT INTO platform_jobs (id, seq, state, doc) VALUES (?, ?, ?, ?)",
                        (job.id, seq, job.state, json.dumps(job.doc())))

    def save(self, job: Job, *, if_state: str | None = None) -> bool:
        """Write the job; with `if_state`, only while the stored state is still that (False: it changed,
        e.g. cancelled by an API call meanwhile)."""
        sql = "UPDATE platform_jobs SET state = ?, doc = ? WHERE id = ?" + (" AND state = ?" if if_state else "")
        params = (job.state, json.dumps(job.doc()), job.id) + ((if_state,) if if_state else ())
        return self.db.changed(sql, params) == 1

    def claim(self, job: Job) -> bool:
        """Store a queued job as running, with its new owner and start (the whole document, at once);
        False when another instance claimed it first."""
        return self.db.changed("UPDATE platform_jobs SET state = 'running', doc = ? WHERE id = ? AND state = 'queued'",
                               (json.dumps(job.doc()), job.id)) == 1

    def get(self, job_id: str) -> Job | None:
        row = self.db.one("SELECT doc FROM platform_jobs WHERE id = ?", (job_id,))
        return Job.from_doc(json.loads(row[0])) if row else None

    def list(self, states: tuple[str, ...] | None = None, limit: int | None = 200) -> list[Job]:
        """Newest first; `states` filters in the query, so no job of those states is ever cut off by `limit`."""
        where = f" WHERE state IN ({', '.join('?' for _ in states)})" if states else ""
        sql = f"SELECT doc FROM platform_jobs{where} ORDER BY seq DESC" + (" LIMIT ?" if limit else "")
        params = tuple(states or ()) + ((limit,) if limit else ())
        return [Job.from_doc(json.loads(d)) for (d,) in self.db.all(sql, params)]

    def count(self) -> int:
        return self.db.one("SELECT COUNT(*) FROM platform_jobs")[0]


class _SQLite:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.lock = threading.Lock()

    def execute(self, sql: str, params: tuple = ()) -> None:
        with self.lock:
            self.conn.execute(sql, params)

    def changed(self, sql: str, params: tuple = ()) -> int:
        with self.lock:
            return self.conn.execute(sql, params).rowcount

    def one(self, sql: str, params: tuple = ()):
        with self.lock:
            return self.conn.execute(sql, params).fetchone()

    def all(self, sql: str, params: tuple = ()):
        with self.lock:
            return self.conn.execute(sql, params).fetchall()


class _Postgres:
    def __init__(self, url: str):
        try:
            import psycopg  # an optional driver: only a PostgreSQL store needs it
        except ImportError:
            raise GuardtuneError("platform store: PostgreSQL needs psycopg (see requirements/runtime.txt)") from None
        self.conn = psycopg.connect(url, autocommit=True)
        self.lock = threading.Lock()

    def execute(self, sql: str, params: tuple = ()) -> None:
        with self.lock:
            self.conn.execute(sql.replace("?", "%s"), params)

    def changed(self, sql: str, params: tuple = ()) -> int:
        with self.lock:
            return self.conn.execute(sql.replace("?", "%s"), params).rowcount

    def one(self, sql: str, params: tuple = ()):
        with self.lock:
            return self.conn.execute(sql.replace("?", "%s"), params).fetchone()

    def all(self, sql: str, params: tuple = ()):
        with self.lock:
            return self.conn.execute(sql.replace("?", "%s"), params).fetchall()
