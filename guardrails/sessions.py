"""Per-session dialogue stage, so a stage inferred on one turn carries to the next.

`SessionStore` is the interface its backends implement (`guardrails/stores/`): SQLite by default, or
PostgreSQL, chosen by a `postgresql://` URL, so several replicas share their sessions.
"""

from __future__ import annotations

from typing import Protocol


class SessionStore(Protocol):
    def get_stage(self, session_id: str) -> str | None: ...
    def set_stage(self, session_id: str, stage: str) -> None: ...
    def close(self) -> None: ...
