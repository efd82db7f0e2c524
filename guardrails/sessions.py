"""Per-session dialogue stage, so a stage inferred on one turn carries to the next.

SQLite by default; `SessionStore` is the interface a shared backend (for several replicas) implements:
PostgreSQL in `guardrails/stores/postgres.py`, chosen by a `postgresql://` URL (`guardrails.stores`).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Protocol


class SessionStore(Protocol):
    def get_stage(self, session_id: str) -> str | None: ...
    def set_stage(self, session_id: str, stage: str) -> None: ...
    def close(self) -> None: ...


class SQLiteSessions:
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
