"""A `train` config from a YAML file plus `key=value` overrides, every problem reported at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kernel.configfile import read_mapping, validated
from kernel.errors import GuardtuneError
from training.config.schema import TrainConfig


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values are read as YAML scalars so `max_steps=20` is an int."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise GuardtuneError(f"override '{pair}': expected key=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        out[key.strip()] = _number(value)
    return out


def _number(value: Any) -> Any:
    """YAML 1.1 reads `1e-4` as a string; a number is meant."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return value


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    raw: dict[str, Any] = {}
    base = Path(".")
    if path is not None:
        path = Path(path)
        raw = read_mapping(path, "config")
        base = path.parent
    resolve_paths(raw, base)
    raw.update(parse_overrides(overrides or []))
    return validate(raw, source=str(path) if path else "overrides")


def resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Make the config's file paths relative to `base` (in place). Data paths in a config file are
    relative to that file, so configs travel with their data; paths given as overrides are relative
    to the working directory, as on any command line."""
    for key in ("train_file", "eval_file"):
        if raw.get(key) and not Path(str(raw[key])).is_absolute():
            raw[key] = str(base / str(raw[key]))
    _relative_mix_paths(raw, base)
    for key in ("hostfile", "deepspeed"):  # a hostfile or DeepSpeed JSON beside the config
        value = str(raw.get(key) or "")
        if (key == "hostfile" or value.endswith(".json")) and value and not Path(value).is_absolute():
            raw[key] = str(base / value)


def _relative_mix_paths(raw: dict[str, Any], base: Path) -> None:
    """`datasets:` paths, replay prompt lists and forgetting_file resolve against the config file too."""
    def fix(holder: Any, key: str) -> None:
        if isinstance(holder, dict) and isinstance(holder.get(key), str) and holder[key] \
                and not Path(holder[key]).is_absolute():
            holder[key] = str(base / holder[key])

    fix(raw, "forgetting_file")
    for src in raw.get("datasets") or [] if isinstance(raw.get("datasets"), list) else []:
        fix(src, "path")
        if isinstance(src, dict):
            fix(src.get("replay"), "prompts")


def validate(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    """A TrainConfig, or a GuardtuneError listing every problem, one line each."""
    return validated(TrainConfig, raw, source)
