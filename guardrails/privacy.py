"""Redaction for storage: every string of a record loses its PII before it is written anywhere."""

from __future__ import annotations

from typing import Any

from guardrails.scanners.pii import PII


def redact_deep(value: Any, pii: PII, keep: frozenset[str] = frozenset()) -> Any:
    """`value` with every string in it (dict values and keys, list items) PII-redacted; the values of
    top-level keys in `keep` (identifiers the server made, such as request ids) stay as they are."""
    if isinstance(value, dict):
        return {k if k in keep else _redact(k, pii): v if k in keep else redact_deep(v, pii)
                for k, v in value.items()}
    return _redact_any(value, pii)


def _redact_any(value: Any, pii: PII) -> Any:
    if isinstance(value, str):
        return _redact(value, pii)
    if isinstance(value, dict):
        return {_redact(k, pii): _redact_any(v, pii) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact_any(v, pii) for v in value]
    return value


def _redact(text: str, pii: PII) -> str:
    return pii.scan(text).text if text else text
