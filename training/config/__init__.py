"""The `train` config: a YAML file plus `key=value` overrides, validated by one pydantic schema.

The schema is built from per-topic sections (sections.py); its rules turn the usual mistakes (a
misspelt key, qlora without 4-bit, merging into a quantized base) into one line each that says
what to change, and every broken one is reported at once.
"""

from training.config.loading import load_config, parse_overrides, resolve_paths, validate
from training.config.schema import TrainConfig
from training.config.sections import DataSource, ReplaySpec

__all__ = ["DataSource", "ReplaySpec", "TrainConfig", "load_config", "parse_overrides", "resolve_paths", "validate"]
