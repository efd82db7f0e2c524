"""Checks for replies that are data, not prose: JSON meeting a schema, and tool calls a task may make.

Compliance maps prose to approved scripts; a JSON or tool-call reply has no script to become, so it
is checked instead: against the schema the client asked for, and against the tools the client offered
and the task is allowed. Plain data in, a verdict out.

The schema is the client's, so its regular expressions run on RE2 (guardrails/linear.py), never on
Python's backtracking `re`: `pattern`, `patternProperties` and the `additionalProperties` they decide.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Iterable

import jsonschema
from jsonschema.exceptions import ValidationError
from referencing import Registry

from guardrails import linear

MAX_SCHEMA_BYTES = 64 << 10
MAX_SCHEMA_DEPTH = 32


@dataclass(frozen=True)
class Verdict:
    valid: bool
    error: str | None = None

    def report(self) -> dict:
        return {"valid": self.valid, "error": self.error}


@functools.lru_cache(maxsize=256)
def _regex(pattern: str):
    return linear.compile(pattern)


def _pattern(validator, pattern, instance, schema):
    if validator.is_type(instance, "string") and not _regex(pattern).search(instance):
        yield ValidationError(f"{instance[:80]!r} does not match {pattern!r}")


def _pattern_properties(validator, patterns, instance, schema):
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _regex(pattern).search(key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator, additional, instance, schema):
    if not validator.is_type(instance, "object"):
        return
    known, patterns = schema.get("properties", {}), schema.get("patternProperties", {})
    extras = [k for k in instance if k not in known and not any(_regex(p).search(k) for p in patterns)]
    if validator.is_type(additional, "object"):
        for key in extras:
            yield from validator.descend(instance[key], additional, path=key)
    elif additional is False and extras:
        yield ValidationError(f"additional properties are not allowed ({', '.join(map(repr, extras[:5]))})")


_LINEAR = {"pattern": _pattern, "patternProperties": _pattern_properties,
           "additionalProperties": _additional_properties}


def _no_remote(uri: str):
    raise LookupError(f"{uri}: only local references ('#...') are resolved")  # never fetched over the network


def _validator(schema: dict):
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return jsonschema.validators.extend(cls, _LINEAR)(schema, registry=Registry(retrieve=_no_remote))


def _depth(value, limit: int) -> int:
    """How deep a JSON value nests, counted up to `limit + 1` (no recursion: a hostile depth costs a loop)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            break
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, d + 1) for c in children)
    return deepest


def check_schema(schema: dict) -> None:
    """A schema the server will decode to and check replies against: bounded, valid, linear-time patterns.
    Raises ValueError with the reason."""
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise ValueError(f"a JSON schema is at most {MAX_SCHEMA_BYTES} bytes")
    if _depth(schema, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        raise ValueError(f"a JSON schema nests at most {MAX_SCHEMA_DEPTH} levels")
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"not a valid JSON schema: {exc.message}") from None
    if remote := [r for r in _refs(schema) if not r.startswith("#")]:
        raise ValueError(f"$ref {remote[0]!r}: only local references ('#...') are taken")
    for pattern in _patterns(schema):
        try:
            _regex(pattern)
        except ValueError:
            raise ValueError(f"pattern {pattern!r}: only linear-time (RE2) patterns are taken, without "
                             f"look-arounds or back-references") from None


def _nodes(schema):
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            yield node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _patterns(schema) -> list[str]:
    out = []
    for node in _nodes(schema):
        if isinstance(node.get("pattern"), str):
            out.append(node["pattern"])
        if isinstance(node.get("patternProperties"), dict):
            out += list(node["patternProperties"])
    return out


def _refs(schema) -> list[str]:
    return [n["$ref"] for n in _nodes(schema) if isinstance(n.get("$ref"), str)]


def _schema_error(instance, schema: dict) -> str | None:
    try:
        err = jsonschema.exceptions.best_match(_validator(schema).iter_errors(instance))
    except Exception as exc:  # noqa: BLE001 - an unresolvable $ref, a cycle: the reply cannot be shown to meet it
        return f"the schema cannot be checked: {type(exc).__name__}"
    if err is None:
        return None
    where = "/".join(str(p) for p in err.absolute_path)
    return f"{where or 'reply'}: {err.message}"[:300]


def check_json(text: str, schema: dict) -> Verdict:
    """`text` is one JSON value that meets `schema`."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return Verdict(False, f"not JSON: {exc}"[:300])
    error = _schema_error(value, schema)
    return Verdict(error is None, error)


class _Pairs(list):
    """A JSON object as its (key, value) pairs: a duplicate key is kept, as some clients read the first."""


def readable(texts: Iterable[str]) -> str:
    """What a person reads in JSON texts: their strings, keys included, unescaped ("\\u006b" is "k"), and
    their numbers (a card number can be one), one per line, in document order. The output scanners read
    a data reply through this, so an escape or a split across fields hides nothing that prose would show.
    A text that is not JSON is read as is."""
    out: list[str] = []
    for text in texts:
        try:
            stack = [json.loads(text, object_pairs_hook=_Pairs)]
        except (ValueError, RecursionError):
            out.append(text)
            continue
        while stack:  # no recursion: a hostile depth costs a loop
            node = stack.pop()
            if isinstance(node, str):
                out.append(node)
            elif isinstance(node, (int, float)) and not isinstance(node, bool):
                out.append(str(node))
            elif isinstance(node, _Pairs):
                stack.extend(reversed([x for pair in node for x in pair]))
            elif isinstance(node, list):
                stack.extend(reversed(node))
    return "\n".join(s for s in out if s.strip())


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
