"""The committed task mapping: which adapter serves each task, and each task's canary, under a version.

Where it is kept (`task_store` in the serve config):
- unset: the state file (`state_file`, default `<adapters_root>/.serve-state.json`), this server's alone.
  It stays the plain `{task: adapter dir}` it always was, with `tasks`/`canaries` keys only while a
  canary runs.
- a file path: a SQLite database that several servers on one host share;
- a `postgresql://` URL: one row in PostgreSQL that replicas on many hosts share.
In the shared two, every change increments the version in the same transaction that writes it, and
each replica polls that row (`TaskRegistry.sync`) and applies what changed. They keep adapter paths
relative to `adapters_root`, so replicas that mount the adapters elsewhere follow too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from guardrails.stores import check_target, redact
from guardrails.stores.postgres import Connection
from guardrails.stores.targets import is_postgres_url
from kernel.errors import GuardtuneError

log = logging.getLogger("guardtune.serve")


class StateNotSaved(GuardtuneError):
    """The task mapping could not be written; the change was not made."""


@dataclass(frozen=True)
class Committed:
    """One version of the mapping. `canaries`: task -> {"path": adapter dir, "share": 0..1}; a canary
    exists only beside its task's stable adapter."""
    version: int = 0
    tasks: dict[str, str] = field(default_factory=dict)
    canaries: dict[str, dict] = field(default_factory=dict)

    def with_task(self, task: str, path: str) -> Committed:
        return replace(self, tasks={**self.tasks, task: path})

    def without_task(self, task: str) -> Committed:
        return replace(self, tasks={t: p for t, p in self.tasks.items() if t != task},
                       canaries={t: c for t, c in self.canaries.items() if t != task})

    def with_canary(self, task: str, path: str, share: float) -> Committed:
        if task not in self.tasks:
            return self
        return replace(self, canaries={**self.canaries, task: {"path": path, "share": share}})

    def without_canary(self, task: str) -> Committed:
        return replace(self, canaries={t: c for t, c in self.canaries.items() if t != task})

    def doc(self) -> dict:
        return {"tasks": self.tasks, "canaries": self.canaries}

    def same_as(self, other: Committed) -> bool:
        return self.doc() == other.doc()

    @classmethod
    def from_doc(cls, version: int, doc: dict) -> Committed:
        if isinstance(doc.get("tasks"), dict):
            return cls(version, dict(doc["tasks"]), dict(doc.get("canaries") or {}))
        return cls(version, dict(doc))  # the state file's plain {task: path}


Change = Callable[[Committed], Committed]


class FileTaskStore:
    """The state file: this server only. A change applies to what the server serves (`served`), as
    written before it switches in memory (write, fsync, rename, fsync the directory)."""

    shared = False

    def __init__(self, path: Path):
        self.path = Path(path)
        self.label = str(self.path)

    def read(self) -> Committed | None:
        try:
            return Committed.from_doc(0, json.loads(self.path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError) as exc:
            raise GuardtuneError(f"serve state {self.path} is unreadable: {exc}") from None

    def update(self, change: Change, served: Committed) -> Committed:
        new = change(served)
        doc = new.doc() if new.canaries else new.tasks
        try:
            write_state(self.path, doc)
        except OSError as exc:
            log.error("serve state %s not written: %s", self.path, exc)
            raise StateNotSaved(f"the task mapping could not be saved to {self.path} "
                                f"({type(exc).__name__}: {exc.strerror or exc}); nothing was changed") from None
        return replace(new, version=served.version + 1)

    def close(self) -> None:
        pass


class _SharedStore:
    """A store replicas share: one row (version, JSON document), changed in a transaction that reads it
    locked, so two replicas' changes at once are applied one after the other, never one over the other."""

    shared = True
    label = ""

    def read(self) -> Committed | None:
        version, doc = self._row()
        return None if version == 0 else Committed.from_doc(version, json.loads(doc))

    def update(self, change: Change, served: Committed) -> Committed:
        try:
            return self._update(change)
        except (GuardtuneError, ValueError) as exc:
            log.error("task store %s not written: %s", self.label, exc)
            raise StateNotSaved(f"the task mapping could not be saved to {self.label} ({exc}); "
                                "nothing was changed on this server") from None

    @staticmethod
    def _next(change: Change, version: int, doc: str) -> tuple[Committed, bool]:
        """The mapping after `change`, and whether it is new (a change that changes nothing keeps the version)."""
        current = Committed.from_doc(version, json.loads(doc)) if version else Committed()
        new = change(current)
        if version and new.same_as(current):
            return current, False
        return replace(new, version=version + 1), True


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS task_mapping (
    id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL, mapping TEXT NOT NULL, updated REAL NOT NULL);
INSERT OR IGNORE INTO task_mapping VALUES (1, 0, '{}', 0);
"""


class SQLiteTaskStore(_SharedStore):
    """The mapping in a SQLite file (WAL, synchronous=FULL): servers on one host share it."""

    def __init__(self, path: Path):
        self.path, self.label = Path(path), str(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SQLITE_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise GuardtuneError(f"task store {self.path}: {exc}") from None

    def _row(self) -> tuple[int, str]:
        with self._lock, self._errors():
            return self._db.execute("SELECT version, mapping FROM task_mapping WHERE id = 1").fetchone()

    def _update(self, change: Change) -> Committed:
        with self._lock, self._errors():
            self._db.execute("BEGIN IMMEDIATE")  # the write lock first: no other writer between read and write
            try:
                new, changed = self._next(change, *self._db.execute("SELECT version, mapping FROM task_mapping").fetchone())
                if changed:
                    self._db.execute("UPDATE task_mapping SET version = ?, mapping = ?, updated = ?",
                                     (new.version, json.dumps(new.doc()), time.time()))
                self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
        return new

    @contextlib.contextmanager
    def _errors(self):
        try:
            yield
        except sqlite3.Error as exc:
            raise GuardtuneError(f"task store {self.path}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()


_PG_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS guardtune_task_mapping (
        id INTEGER PRIMARY KEY CHECK (id = 1), version BIGINT NOT NULL, mapping TEXT NOT NULL,
        updated DOUBLE PRECISION NOT NULL)""",
    "INSERT INTO guardtune_task_mapping VALUES (1, 0, '{}', 0) ON CONFLICT (id) DO NOTHING",
)


class PostgresTaskStore(_SharedStore):
    """The mapping in PostgreSQL, through the audit and session stores' connection (created under an
    advisory lock, reopened once when the server drops it, the password never in messages)."""

    def __init__(self, url: str):
        self.label = redact(url)
        self._c = Connection(url, "task store", _PG_SCHEMA)  # one connection handling for every shared store

    def _row(self) -> tuple[int, str]:
        return self._c.run(lambda c: c.execute(
            "SELECT version, mapping FROM guardtune_task_mapping WHERE id = 1").fetchone())

    def _update(self, change: Change) -> Committed:
        def txn(c):
            with c.transaction():  # the row stays locked until the update commits
                row = c.execute("SELECT version, mapping FROM guardtune_task_mapping WHERE id = 1 FOR UPDATE").fetchone()
                new, changed = self._next(change, *row)
                if changed:
                    c.execute("UPDATE guardtune_task_mapping SET version = %s, mapping = %s, updated = %s WHERE id = 1",
                              (new.version, json.dumps(new.doc()), time.time()))
                return new
        return self._c.run(txn)

    def close(self) -> None:
        self._c.close()


def open_task_store(target: str | Path | None, state_file: Path):
    """The state file when `target` is None, else the shared store it names (SQLite file or URL)."""
    if target is None:
        return FileTaskStore(state_file)
    if is_postgres_url(target):
        return PostgresTaskStore(str(target))
    return SQLiteTaskStore(check_target(target))


def write_state(path: Path, mapping: dict) -> None:
    """Write-fsync-rename, then fsync the directory so the rename itself survives a power cut.
    Raises OSError only while the old file is still the one on disk."""
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        with tmp.open("w") as fh:
            fh.write(json.dumps(mapping, indent=2))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    try:
        fsync_dir(directory)
    except OSError as exc:  # the new file is in place and is what a reader sees: the change stands
        log.warning("serve state %s written but its directory not fsynced: %s", path, exc)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
