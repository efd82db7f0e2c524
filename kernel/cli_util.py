"""Shared CLI plumbing: known failures become one line on stderr and exit code 2."""

from __future__ import annotations

import os
import sys
from typing import Callable

from kernel.errors import GuardtuneError


def run_cli(fn: Callable[[], int]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from packages or local dirs
    try:
        return fn() or 0
    except GuardtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
