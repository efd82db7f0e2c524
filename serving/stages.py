"""Pipeline stages that put the guardrails library in front of the engine."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import time

import anyio

from guardrails.compliance import Compliance
from guardrails.moderation import Moderator, judge
from guardrails.output import LeakIndex, OutputFilter
from guardrails.privacy import redact_deep
from guardrails.scanners.pii import PII
from guardrails.scripts import ScriptStore, build_store
from guardrails.stores import open_audit_store, open_session_store
from kernel.roles import INSTRUCTION_ROLES
from rag.index import KnowledgeIndex
from rag.prompting import citations, with_context
from serving.pipeline import ChatContext, Intercept

BASE = "base"  # the metrics and audit label of the base model
SERVER_IDS = frozenset({"request_id", "ts", "api_key_id"})  # made by the server: never PII, kept verbatim
WHOLE_SCANNERS = ("prompt_injection", "classifier", "banned_topics")  # they also read the request as one text


class GuardScope:
    """Which requests the guardrails cover: the `tasks:` list ('*' is every task) and the base model."""

    def __init__(self, tasks: list[str], base_model: str = "guarded"):
        self.tasks, self.base_model = set(tasks), base_model

    def covers(self, task: str) -> bool:
        if task == BASE:
            return self.base_model == "guarded"
        return "*" in self.tasks or task in self.tasks


def read_as(messages: list[dict], names: int) -> list[str]:
    """The role each text is moderated as: the system or developer turns that open a request are the
    developer's instructions; one after a client turn is read as a user turn, as is every `name`."""
    roles, opening = [], True
    for m in messages:
        opening = opening and m["role"] in INSTRUCTION_ROLES
        roles.append(m["role"] if opening else "user")
    return roles + ["user"] * names


class ModerationStage:
    """Every client-written turn (any role, and its `name`) goes through the scanners, the system turns that
    open the request as the developer's instructions (moderation.INSTRUCTION_CATEGORIES); then the other
    turns as one text, so a payload split across turns is read whole. A block never reaches the engine."""

    name = "moderation"

    def __init__(self, moderator: Moderator, scope: GuardScope):
        self.moderator, self.scope = moderator, scope
        self.detectors = [s for s in moderator.scanners if s.name in WHOLE_SCANNERS]

    async def before(self, ctx: ChatContext) -> Intercept | None:
        if not self.scope.covers(ctx.task):
            return None
        return await asyncio.to_thread(self._moderate, ctx)  # one thread hop for the whole request

    def _moderate(self, ctx: ChatContext) -> Intercept | None:
        t0 = time.perf_counter()
        reports, untrusted, waived = [], [], []  # untrusted: sanitised, for the whole read
        texts = [m["content"] for m in ctx.messages] + ctx.names
        for i, (text, role) in enumerate(zip(texts, read_as(ctx.messages, len(ctx.names)))):
            res = self.moderator.check(text, task=ctx.task, role=role)
            reports.append(res.report())
            if i < len(ctx.messages):
                ctx.messages[i]["content"] = res.text  # normalised, PII redacted
            if (blocked := res.blocked_by) is not None:
                return self._block(ctx, blocked, res.report()["verdicts"], t0)
            if self.moderator.cfg.instructions(role):
                waived += [{"turn": i, "categories": res.waived()}] if res.waived() else []
            else:
                untrusted.append(res.text)  # a system prompt joined on would lend the rest its instructions
        if len(untrusted) > 1:
            whole = " ".join(untrusted)
            blocking = self.moderator.cfg.blocking(ctx.task)
            for scanner in self.detectors:
                if not (v := judge(scanner.scan(whole), blocking)).valid:
                    return self._block(ctx, v, [{"scanner": v.scanner, "valid": False, "score": round(v.score, 4),
                                                 "reason": f"whole request: {v.reason}"}], t0)
        redacted = [v for r in reports for v in r["verdicts"] if v["scanner"] == "pii" and v["score"] > 0]
        ctx.report["input"] = {"blocked_by": None, "redacted": [v["reason"] for v in redacted],
                               "latency_ms": _ms(t0)}
        if waived:  # flagged in the developer's instructions, where these categories do not block
            ctx.report["input"]["waived"] = waived
        return None

    def _block(self, ctx: ChatContext, blocked, verdicts: list[dict], t0: float) -> Intercept:
        ctx.report["input"] = {"blocked_by": blocked.scanner, "score": round(blocked.score, 4),
                               "reason": blocked.reason, "verdicts": verdicts, "latency_ms": _ms(t0)}
        return Intercept(self.moderator.refusal(blocked.scanner))


class OutputStage:
    """PII redaction and system-prompt leak checks on every guarded reply (streamed or whole)."""

    def __init__(self, cfg, scope: GuardScope):
        self.cfg, self.scope = cfg, scope
        self.pii = PII() if cfg.redact_pii else None
        self._secret = os.urandom(16)  # canaries differ per process, so no log or old reply predicts one

    def canary(self, task: str) -> str | None:
        if not self.cfg.canary or not self.scope.covers(task):
            return None
        return "gt-" + hmac.new(self._secret, task.encode(), hashlib.sha256).hexdigest()[:12]

    def filter_for(self, ctx: ChatContext) -> OutputFilter | None:
        if not self.scope.covers(ctx.task):
            return None
        leaks = LeakIndex.of(ctx.protected, self.cfg.leak_min_chars)
        if (marker := self.canary(ctx.task)) is not None:
            leaks.markers.append(marker)
        return OutputFilter(self.pii, leaks)

    def leak_reply(self) -> str:
        return self.cfg.leak_reply


class ComplianceStage:
    """Approved-script matching after the model: enforce replaces the reply, monitor only records."""

    name = "compliance"

    def __init__(self, cfg, scope: GuardScope, output_scanners=None):
        self.cfg, self.scope = cfg, scope
        self.compliance = Compliance(self._load_store(), output_scanners=output_scanners)
        self.sessions = open_session_store(cfg.sessions_db)  # SQLite file, or PostgreSQL shared by replicas

    def _load_store(self):
        if not (self.cfg.store / "meta.json").is_file() and self.cfg.library is not None:
            build_store(self.cfg.library, self.cfg.store, log=lambda m: None)
        return ScriptStore.load(self.cfg.store)

    def reload(self) -> dict:
        """Load the store again from disk; a bad store raises and the old one keeps serving."""
        store = self._load_store()
        self.compliance.store = store
        return {"version": store.version, "scripts": len(store.scripts), "path": str(store.path)}

    def _mode(self, task: str):
        if not self.scope.covers(task):
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
        return await asyncio.to_thread(self._decide, ctx, text, t)

    async def screen(self, ctx: ChatContext, text: str) -> str:
        """Why the output scanners stop a data reply's readable text ("" when they do not, or the task is
        not under compliance): a JSON or tool-call reply has no script to become, but it is scanned."""
        if self._mode(ctx.task) is None:
            return ""
        return await asyncio.to_thread(self.compliance.screen, text)

    def _decide(self, ctx: ChatContext, text: str, t) -> str:
        """Stage, then decision, off the event loop (session reads and writes are database calls)."""
        session = ctx.scoped_session  # a session belongs to the key that made it
        stage = ctx.dialogue_stage
        if stage is None:
            previous = self.sessions.get_stage(session) if session else None
            last_user = next((m["content"] for m in reversed(ctx.messages) if m["role"] == "user"), "")
            stage = self.compliance.infer_stage(last_user, previous)
        if session and stage:
            self.sessions.set_stage(session, stage)
        decision = self.compliance.decide(text, stage=stage, session_id=session, threshold=t.threshold)
        # The raw reply is not in the report: the report goes to the client, the raw reply only to the audit.
        ctx.report["output"] = {"mode": t.mode, **decision.report()}
        return decision.sent if t.mode == "enforce" else text


class Audit:
    """Every guarded request leaves one durable record (written before the reply is finished).

    Every string in it is PII-redacted first, whatever the moderation settings and whatever blocked
    the request, and the write runs in a thread, shielded: a client that hangs up mid-stream still
    leaves its record."""

    def __init__(self, path, scope: GuardScope):
        self.store, self.scope = open_audit_store(path), scope  # SQLite file or postgresql:// URL
        self._pii = PII()

    def applies(self, task: str) -> bool:
        return self.scope.covers(task)

    async def write(self, record: dict) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._write, record)

    def _write(self, record: dict) -> None:
        self.store.write(redact_deep(record, self._pii, keep=SERVER_IDS))

    async def purge_older_than(self, days: float) -> int:
        return await anyio.to_thread.run_sync(self.store.purge, time.time() - days * 86400)


class RetrievalStage:
    """Knowledge-base chunks into the prompt with [n] markers; the response carries the citations."""

    name = "retrieval"

    def __init__(self, per_task: dict):
        self.per_task = per_task
        self.indexes = {task: self._load(c.index) for task, c in per_task.items()}

    @staticmethod
    def _load(path):
        return KnowledgeIndex.load(path)

    def reload(self) -> dict:
        """All indexes are loaded first; if any fails, the old ones keep serving."""
        fresh = {task: self._load(c.index) for task, c in self.per_task.items()}
        self.indexes = fresh
        return {task: {"chunks": len(ix.chunks), "path": str(ix.path)} for task, ix in fresh.items()}

    async def before(self, ctx: ChatContext) -> Intercept | None:
        index = self.indexes.get(ctx.task)
        if index is None or ctx.kind != "chat":
            return None
        c = self.per_task[ctx.task]
        query = next((m["content"] for m in reversed(ctx.messages) if m["role"] == "user"), "")
        t0 = time.perf_counter()
        hits = await asyncio.to_thread(index.search, query, c.top_k, c.min_score)
        ctx.messages = with_context(ctx.messages, hits, ctx.system_prompt)
        ctx.citations = citations(hits)
        ctx.report["retrieved"] = [f"{h.doc_id}#{h.chunk}" for h in hits]
        ctx.report["retrieval_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        return None


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)
