"""What names a store: a file path means SQLite, a `postgresql://` URL PostgreSQL; and URLs fit to print."""

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
