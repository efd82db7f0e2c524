"""Write docs/config.md: every key of the train and serve configs, from the pydantic schemas.

The reference is generated so it cannot drift from the code; tests/test_docs.py fails when the
committed file is stale. Run: `.venv/bin/python scripts/config_reference.py`.
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "docs" / "config.md"


def _type(annotation) -> str:
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    text = text or str(annotation).replace("typing.", "").replace("pathlib.", "")
    return text.replace("|", "\\|")


def _default(field) -> str:
    if field.is_required():
        return "**required**"
    value = field.default if field.default is not PydanticUndefined else field.default_factory()
    if isinstance(value, BaseModel):
        return "(see below)"
    return f"`{value!r}`".replace("|", "\\|")


def _nested(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _nested(arg)]


def table(model: type[BaseModel], prefix: str, seen: set) -> list[str]:
    lines = [f"### `{prefix or model.__name__}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    children = []
    for name, field in model.model_fields.items():
        desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{name}` | {_type(field.annotation)} | {_default(field)} | {desc} |")
        for sub in _nested(field.annotation):
            if sub not in seen:
                seen.add(sub)
                children.append((sub, f"{prefix}.{name}" if prefix else name))
    lines.append("")
    for sub, path in children:
        lines += table(sub, path, seen)
    return lines


def render() -> str:
    from serving.config import ServeConfig
    from training.config import TrainConfig

    parts = ["# Config reference", "",
             "Generated from the pydantic schemas by `scripts/config_reference.py`; do not edit by hand.",
             "Unknown keys are refused with a one-line error that names the closest known key.", "",
             "## `train` (a YAML file plus `key=value` overrides)", ""]
    parts += table(TrainConfig, "", {TrainConfig})
    parts += ["## `guardtune serve --config FILE`", ""]
    parts += table(ServeConfig, "", {ServeConfig})
    return "\n".join(parts).rstrip() + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(render())
    print(OUT)
