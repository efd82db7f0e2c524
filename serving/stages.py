"""Pipeline stages that put the guardrails library in front of the engine."""

from __future__ import annotations

import asyncio

from guardrails.moderation import Moderator
from serving.pipeline import ChatContext, Intercept

SCANNED_ROLES = ("user", "system", "developer")  # everything the client wrote


class ModerationStage:
    """Every client-written turn goes through the scanners; a block never reaches the engine."""

    name = "moderation"

    def __init__(self, moderator: Moderator, tasks: list[str]):
        self.moderator, self.tasks = moderator, set(tasks)

    def applies(self, task: str) -> bool:
        return "*" in self.tasks or task in self.tasks

    async def before(self, ctx: ChatContext) -> Intercept | None:
        if not self.applies(ctx.task):
            return None
        reports = []
        for m in ctx.messages:
            if m["role"] not in SCANNED_ROLES:
                continue
            res = await asyncio.to_thread(self.moderator.check, m["content"])
            reports.append(res.report())
            if (blocked := res.blocked_by) is not None:
                ctx.report["input"] = {"blocked_by": blocked.scanner, "score": round(blocked.score, 4),
                                       "reason": blocked.reason, "verdicts": res.report()["verdicts"]}
                return Intercept(self.moderator.refusal(blocked.scanner))
            m["content"] = res.text  # normalised, PII redacted
        redacted = [v for r in reports for v in r["verdicts"] if v["scanner"] == "pii" and v["score"] > 0]
        ctx.report["input"] = {"blocked_by": None, "redacted": [v["reason"] for v in redacted],
                               "latency_ms": round(sum(r["latency_ms"] for r in reports), 2)}
        return None
