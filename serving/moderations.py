"""POST /v1/moderations: the pipeline's own input scanners and classifier, in OpenAI's shape (category
names and scores as the official client reads them), under chat's caps and admission."""

from __future__ import annotations

import asyncio
import uuid

from guardrails.moderation import Moderator
from serving.errors import APIError
from serving.protocol import MODERATION_MAX_INPUTS, ModerationRequest


class ModerationService:
    def __init__(self, state):
        self.s = state  # serving.state.ServerState
        self._moderator: Moderator | None = None

    def moderator(self) -> Moderator:
        """The pipeline's own scanners when there are guardrails, else the defaults (built once)."""
        if self._moderator is None:
            stage = next((s for s in self.s.pipeline.pre if s.name == "moderation"), None)
            self._moderator = stage.moderator if stage is not None else Moderator()
        return self._moderator

    async def handle(self, body: ModerationRequest) -> dict:
        texts = [body.input] if isinstance(body.input, str) else body.input
        if len(texts) > MODERATION_MAX_INPUTS or any(not t for t in texts):
            raise APIError(400, f"input: 1 to {MODERATION_MAX_INPUTS} non-empty strings", param="input")
        cap = self.s.cfg.limits.max_input_chars
        if (longest := max(len(t) for t in texts)) > cap:  # before any scan, as for chat
            raise APIError(400, f"an input holds {longest} characters; this server takes up to {cap}",
                           param="input", code="input_too_long")
        moderator = self.moderator()
        async with self.s.admission.slot():  # the same back-pressure as chat
            results = await asyncio.to_thread(moderator.openai_results, texts)  # one classifier batch
        return {"id": f"modr-{uuid.uuid4().hex[:24]}", "model": body.model or "guardtune-moderation",
                "results": results}
