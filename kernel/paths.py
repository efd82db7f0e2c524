"""Where guardtune keeps things on disk."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """User cache for materialised models and tokenised datasets (GUARDTUNE_CACHE overrides)."""
    env = os.environ.get("GUARDTUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "guardtune"


DEFAULT_ADAPTERS_DIR = Path("adapters")
DEFAULT_RUNS_DIR = Path("runs")
MANIFEST_NAME = "guardtune.json"
