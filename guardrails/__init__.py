"""Guardrails: input moderation and output compliance, a library that serving calls."""
