"""Reading YAML configs and explaining every pydantic error, one line each, for every config schema.

A schema states its cross-key rules as `@rule` methods of a `RuleChecked` model: each is named for
what it requires and returns what is wrong and how to fix it. All of them run, so one pass over a
config reports every broken rule, not only the first.
"""

from __future__ import annotations

import difflib
from functools import cache
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml
from pydantic import BaseModel, ValidationError, model_validator

from kernel.errors import GuardtuneError

Model = TypeVar("Model", bound=BaseModel)
Found = str | list[str] | None  # what a rule returns: a problem, several, or none


def read_mapping(path: str | Path, what: str = "config") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise GuardtuneError(f"{what} {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise GuardtuneError(f"{what} {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise GuardtuneError(f"{what} {path}: top level must be a mapping of keys to values")
    return raw


def rule(check: Callable[[Any], Found]) -> Callable[[Any], Found]:
    """Mark a method of a RuleChecked model as one of its rules."""
    check.config_rule = True  # type: ignore[attr-defined]
    return check


class BrokenRules(ValueError):
    """Every broken rule of one model, raised together; pydantic keeps it in the error's ctx."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@cache
def _rules(model: type) -> tuple[Callable[[Any], Found], ...]:
    """The model's rules, base classes' first, each in the order it is written."""
    found: dict[str, Callable[[Any], Found]] = {}
    for klass in reversed(model.__mro__):
        found |= {name: f for name, f in vars(klass).items() if getattr(f, "config_rule", False)}
    return tuple(found.values())


class RuleChecked(BaseModel):
    """A model whose `@rule` methods all run once its fields are valid."""

    @model_validator(mode="after")
    def _every_rule_holds(self):
        problems: list[str] = []
        for check in _rules(type(self)):
            found = check(self)
            problems += [found] if isinstance(found, str) else found or []
        if problems:
            raise BrokenRules(problems)
        return self


def explain(err: dict[str, Any], fields) -> str:
    """One pydantic error as a sentence; a misspelt key gets the closest real one."""
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(err["loc"][-1]), list(fields), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown key '{loc}'{hint}"
    if err["type"] == "missing":
        return f"missing required key '{loc}'"
    msg = err["msg"].removeprefix("Value error, ")
    return f"'{loc}': {msg}" if loc else msg


def explain_all(exc: ValidationError, fields) -> list[str]:
    """Every problem of one validation, one sentence each; broken rules count one by one."""
    problems: list[str] = []
    for err in exc.errors():
        broken = (err.get("ctx") or {}).get("error")
        if isinstance(broken, BrokenRules):
            problems += [explain({**err, "msg": p}, fields) for p in broken.problems]
        else:
            problems.append(explain(err, fields))
    return problems


def problems_message(source: str, problems: list[str]) -> str:
    """One problem on one line; several as a count, then one indented line each."""
    if len(problems) == 1:
        return f"{source}: {problems[0]}"
    return f"{source}: {len(problems)} problems\n" + "\n".join(f"  {p}" for p in problems)


def validated(model: type[Model], raw: dict[str, Any], source: str, fields=None) -> Model:
    """`model` built from `raw`, or a GuardtuneError naming every problem; `fields` are the keys
    a misspelling is matched against (default: the model's)."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = explain_all(exc, model.model_fields if fields is None else fields)
    raise GuardtuneError(problems_message(source, problems))
