"""Reading an OpenAI-shaped error answer: the one place callers of a guardtune API get its message."""

from __future__ import annotations


def error_message(response, limit: int = 300) -> str:
    """`{"error": {"message": ...}}`'s message, or the start of the body when it is not that shape."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:limit]
