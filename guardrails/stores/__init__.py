"""Where the session and audit stores live: a file path means SQLite, a `postgresql://` URL PostgreSQL.

SQLite (the default, `sqlite.py`) suits one server. Several replicas behind a load balancer must share
their sessions and their audit trail, so they point at one PostgreSQL server instead (`postgres.py`).
Both backends implement the same small interface (`guardrails.sessions.SessionStore`,
`guardrails.audit.AuditBackend`) and behave the same.
"""

from __future__ import annotations

from pathlib import Path

from guardrails.stores.postgres import PostgresAuditStore, PostgresSessions
from guardrails.stores.sqlite import AuditStore, SQLiteSessions
from guardrails.stores.targets import check_target, is_postgres_url, is_url, redact

__all__ = ["check_target", "is_url", "open_audit_store", "open_session_store", "redact"]


def open_audit_store(target: str | Path):
    """An AuditStore (SQLite file) or a PostgresAuditStore (URL) for `target`."""
    if is_postgres_url(target):
        return PostgresAuditStore(str(target))
    return AuditStore(check_target(target))


def open_session_store(target: str | Path):
    """SQLiteSessions (file) or PostgresSessions (URL) for `target`."""
    if is_postgres_url(target):
        return PostgresSessions(str(target))
    return SQLiteSessions(check_target(target))
