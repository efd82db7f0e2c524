"""Reading YAML configs and explaining pydantic errors in one line, for every config schema."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from kernel.errors import GuardtuneError


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
