"""Checks for replies that are data, not prose: JSON meeting a schema, and tool calls a task may make.

Compliance maps prose to approved scripts; a JSON or tool-call reply has no script to become, so it
is checked instead: against the schema the client asked for, and against the tools the client offered
and the task is allowed. Plain data in, a verdict out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable

import jsonschema


@dataclass(frozen=True)
class Verdict:
    valid: bool
    error: str | None = None

    def report(self) -> dict:
        return {"valid": self.valid, "error": self.error}


def _schema_error(instance, schema: dict) -> str | None:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    err = jsonschema.exceptions.best_match(cls(schema).iter_errors(instance))
    if err is None:
        return None
    where = "/".join(str(p) for p in err.absolute_path)
    return f"{where or 'reply'}: {err.message}"[:300]


def check_json(text: str, schema: dict) -> Verdict:
    """`text` is one JSON value that meets `schema`."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        return Verdict(False, f"not JSON: {exc}"[:300])
    error = _schema_error(value, schema)
    return Verdict(error is None, error)


def check_calls(calls: Iterable[tuple[str, str]], offered: dict[str, dict], allowed: set[str] | None) -> Verdict:
    """Each (name, arguments) names an offered tool the task may call, with arguments meeting its schema."""
    for name, arguments in calls:
        if name not in offered:
            return Verdict(False, f"calls '{name}', which the request did not offer")
        if allowed is not None and name not in allowed:
            return Verdict(False, f"calls '{name}', which this task may not call")
        verdict = check_json(arguments, offered[name])
        if not verdict.valid:
            return Verdict(False, f"{name}: {verdict.error}")
    return Verdict(True)
