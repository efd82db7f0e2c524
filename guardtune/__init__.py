"""guardtune: fine-tune chat models into adapters and serve them behind guardrails."""

from kernel import __version__

__all__ = ["__version__"]
