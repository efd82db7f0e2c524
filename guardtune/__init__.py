"""guardtune: fine-tune chat models into adapters and serve them behind guardrails."""

__version__ = "0.1.0"
