"""Shared by the benchmarks: machine/date metadata, markdown tables, and the results files."""

from __future__ import annotations

import json
import os
import platform
from datetime import date
from pathlib import Path


def meta(**extra) -> dict:
    return {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores", **extra}


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def write(out: Path, payload: dict, lines: list[str]) -> None:
    """`out`.json holds everything; `out`.md is what the README cites."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
