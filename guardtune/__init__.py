"""guardtune: fine-tune chat models into adapters and serve them behind guardrails."""

# The one place the version is written: pyproject.toml reads it from here, and `train` from the metadata.
__version__ = "0.1.0"
