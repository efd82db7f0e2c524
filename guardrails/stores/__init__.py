"""Where the session and audit stores live: a file path means SQLite, a `postgresql://` URL PostgreSQL.

SQLite (the default) suits one server. Several replicas behind a load balancer must share their
sessions and their audit trail, so they point at one PostgreSQL server instead. Both backends
implement the same small interface (`guardrails.sessions.SessionStore`, `guardrails.audit.AuditBackend`)
and behave the same.
"""

from __future__ import annotations

import re
from pathlib import Path

URL_SCHEMES = ("postgresql://", "postgres://")


def is_url(target: object) -> bool:
    """A `scheme://` string (as opposed to a file path)."""
    return isinstance(target, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", target) is not None


def is_postgres_url(target: object) -> bool:
    return isinstance(target, str) and target.lower().startswith(URL_SCHEMES)


def check_target(target: str | Path) -> str | Path:
    """A path stays a Path; a PostgreSQL URL stays a string; any other URL is a one-line error (ValueError)."""
    if not isinstance(target, (str, Path)):
        raise ValueError(f"expected a SQLite file path or a postgresql:// URL, got {type(target).__name__}")
    if is_postgres_url(target):
        return str(target)
    if is_url(target):
        raise ValueError(f"{redact(str(target))}: only postgresql:// URLs or SQLite file paths are supported")
    return Path(target)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def open_audit_store(target: str | Path):
    """An AuditStore (SQLite file) or a PostgresAuditStore (URL) for `target`."""
    if is_postgres_url(target):
        from guardrails.stores.postgres import PostgresAuditStore

        return PostgresAuditStore(str(target))
    from guardrails.audit import AuditStore

    return AuditStore(check_target(target))


def open_session_store(target: str | Path):
    """SQLiteSessions (file) or PostgresSessions (URL) for `target`."""
    if is_postgres_url(target):
        from guardrails.stores.postgres import PostgresSessions

        return PostgresSessions(str(target))
    from guardrails.sessions import SQLiteSessions

    return SQLiteSessions(check_target(target))
