"""Pipeline stages that put the guardrails library in front of the engine."""

from __future__ import annotations

import asyncio
import time

from guardrails.moderation import Moderator
from serving.pipeline import ChatContext, Intercept

SCANNED_ROLES = ("user", "system", "developer")  # everything the client wrote


def guarded(tasks: set[str], task: str) -> bool:
    """The guardrails' `tasks:` list: names, or '*' for every task and the base."""
    return "*" in tasks or task in tasks


class ModerationStage:
    """Every client-written turn goes through the scanners; a block never reaches the engine."""

    name = "moderation"

    def __init__(self, moderator: Moderator, tasks: list[str]):
        self.moderator, self.tasks = moderator, set(tasks)

    async def before(self, ctx: ChatContext) -> Intercept | None:
        if not guarded(self.tasks, ctx.task):
            return None
        reports = []
        for m in ctx.messages:
            if m["role"] not in SCANNED_ROLES:
                continue
            res = await asyncio.to_thread(self.moderator.check, m["content"])
            reports.append(res.report())
            m["content"] = res.text  # normalised, PII redacted: also what the audit keeps of a blocked turn
            if (blocked := res.blocked_by) is not None:
                ctx.report["input"] = {"blocked_by": blocked.scanner, "score": round(blocked.score, 4),
                                       "reason": blocked.reason, "verdicts": res.report()["verdicts"],
                                       "latency_ms": round(sum(r["latency_ms"] for r in reports), 2)}
                return Intercept(self.moderator.refusal(blocked.scanner))
        redacted = [v for r in reports for v in r["verdicts"] if v["scanner"] == "pii" and v["score"] > 0]
        ctx.report["input"] = {"blocked_by": None, "redacted": [v["reason"] for v in redacted],
                               "latency_ms": round(sum(r["latency_ms"] for r in reports), 2)}
        return None


class ComplianceStage:
    """Approved-script matching after the model: enforce replaces the reply, monitor only records."""

    name = "compliance"

    def __init__(self, cfg, tasks: list[str], output_scanners=None):
        from guardrails.compliance import Compliance
        from guardrails.stores import open_session_store

        self.cfg, self.tasks = cfg, set(tasks)
        self.compliance = Compliance(self._load_store(), output_scanners=output_scanners)
        self.sessions = open_session_store(cfg.sessions_db)  # SQLite file, or PostgreSQL shared by replicas

    def _load_store(self):
        from guardrails.scripts import ScriptStore, build_store

        if not (self.cfg.store / "meta.json").is_file() and self.cfg.library is not None:
            build_store(self.cfg.library, self.cfg.store, log=lambda m: None)
        return ScriptStore.load(self.cfg.store)

    def reload(self) -> dict:
        """Load the store again from disk; a bad store raises and the old one keeps serving."""
        store = self._load_store()
        self.compliance.store = store
        return {"version": store.version, "scripts": len(store.scripts), "path": str(store.path)}

    def _mode(self, task: str):
        if not guarded(self.tasks, task):
            return None
        t = self.cfg.for_task(task)
        return None if t.mode == "off" else t

    def buffers(self, task: str) -> bool:
        t = self._mode(task)
        return t is not None and t.mode == "enforce"

    async def after(self, ctx: ChatContext, text: str) -> str:
        t = self._mode(ctx.task)
        if t is None:
            return text
        stage = ctx.dialogue_stage
        if stage is None:
            previous = self.sessions.get_stage(ctx.session_id) if ctx.session_id else None
            last_user = next((m["content"] for m in reversed(ctx.messages) if m["role"] == "user"), "")
            stage = await asyncio.to_thread(self.compliance.infer_stage, last_user, previous)
        if ctx.session_id and stage:
            self.sessions.set_stage(ctx.session_id, stage)
        decision = await asyncio.to_thread(self.compliance.decide, text, stage=stage, session_id=ctx.session_id,
                                           threshold=t.threshold)
        ctx.report["output"] = {"mode": t.mode, "raw": text, **decision.report()}
        return decision.sent if t.mode == "enforce" else text


class Audit:
    """Every guarded request leaves one durable record (written before the reply is finished)."""

    def __init__(self, path, tasks: list[str]):
        from guardrails.stores import open_audit_store

        self.store, self.tasks = open_audit_store(path), set(tasks)  # SQLite file or postgresql:// URL

    def applies(self, task: str) -> bool:
        return guarded(self.tasks, task)

    def write(self, record: dict) -> None:
        self.store.write(record)


class RetrievalStage:
    """Knowledge-base chunks into the prompt with [n] markers; the response carries the citations."""

    name = "retrieval"

    def __init__(self, per_task: dict):
        self.per_task = per_task
        self.indexes = {task: self._load(c.index) for task, c in per_task.items()}

    @staticmethod
    def _load(path):
        from rag.index import KnowledgeIndex

        return KnowledgeIndex.load(path)

    def reload(self) -> dict:
        """All indexes are loaded first; if any fails, the old ones keep serving."""
        fresh = {task: self._load(c.index) for task, c in self.per_task.items()}
        self.indexes = fresh
        return {task: {"chunks": len(ix.chunks), "path": str(ix.path)} for task, ix in fresh.items()}

    async def before(self, ctx: ChatContext) -> Intercept | None:
        index = self.indexes.get(ctx.task)
        if index is None:
            return None
        from rag.prompting import citations, with_context

        c = self.per_task[ctx.task]
        query = next((m["content"] for m in reversed(ctx.messages) if m["role"] == "user"), "")
        t0 = time.perf_counter()
        hits = await asyncio.to_thread(index.search, query, c.top_k, c.min_score)
        ctx.messages = with_context(ctx.messages, hits, ctx.system_prompt)
        ctx.citations = citations(hits)
        ctx.report["retrieved"] = [f"{h.doc_id}#{h.chunk}" for h in hits]
        ctx.report["retrieval_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        return None
