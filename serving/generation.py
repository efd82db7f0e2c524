"""One admitted generation, shared by chat and text completions.

Engine deltas are gathered per choice; each choice then gets the guard's decision for its kind of reply:
- prose goes through the output filter (leaks, PII) and compliance (enforce sends the decision);
- a JSON or tool-call reply goes through the output filter, is checked against its schema and the
  task's tools (guardrails/structured.py), and its strings go through the output scanners (banned
  topics, PII); enforce withholds one that fails, nothing replaces it.
Logprobs stay only on a choice whose text went out as the model wrote it. Metrics and the audit record
close the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Callable

import anyio
from fastapi.responses import StreamingResponse

from guardrails import outcomes
from guardrails.structured import Verdict, check_calls, check_json, readable
from serving.engines.base import EngineDead, EngineRefused, GenParams, TokenLogprob
from serving.errors import APIError
from serving.metrics import RequestRecord
from serving.pipeline import ChatContext
from serving.protocol import Usage
from serving.tools import Call


@dataclass
class ReplyKind:
    """What a reply is expected to be: prose (the default), JSON meeting `schema`, or tool calls."""
    schema: dict | None = None  # response_format's schema (json_object: any object)
    tool_mode: str = "none"  # serving.tools.mode: none, auto, required, named
    read_calls: Callable[[str], tuple[list[Call], str | None]] | None = None
    offered: dict[str, dict] = field(default_factory=dict)  # tool name -> its parameters schema
    allowed: set[str] | None = None  # the task's tool allow-list (guardrails.tools); None: any offered tool

    @property
    def is_data(self) -> bool:
        return self.schema is not None or self.tool_mode != "none"


@dataclass
class Choice:
    index: int
    filter: object | None  # guardrails.output.OutputFilter, or None when unguarded
    steps: list[TokenLogprob] | None  # None: logprobs not asked for
    parts: list[str] = field(default_factory=list)
    n_out: int = 0
    finish: str = "error"
    raw: str | None = None  # what the model said: only the audit store keeps it (redacted)
    sent: str | None = None  # the content the client gets (None: none, as with a tool call)
    calls: list[Call] = field(default_factory=list)
    decision: dict | None = None  # the guard's decision on this choice (the `guardrails.output` report)
    keep_logprobs: bool = True

    def logprobs(self) -> list[TokenLogprob] | None:
        return self.steps if self.keep_logprobs else None


class Run:
    """deltas -> per-choice decisions -> what the route sends; then metrics and the audit record."""

    def __init__(self, state, ctx: ChatContext, label: str, prompt_ids: list[int], params: GenParams, slot,
                 t0: float, reply: ReplyKind):
        self.s, self.ctx, self.label = state, ctx, label
        self.prompt_ids, self.params, self.slot, self.t0, self.reply = prompt_ids, params, slot, t0, reply
        self.ttft: float | None = None
        output = state.pipeline.output
        first = output.filter_for(ctx) if output is not None else None
        self.guarded = first is not None
        want = params.logprobs is not None
        self.choices = [Choice(i, (first if i == 0 else output.filter_for(ctx)) if self.guarded else None,
                               [] if want else None) for i in range(params.n)]

    @property
    def enforce(self) -> bool:
        return self.s.pipeline.buffers(self.label)

    def buffered(self) -> bool:
        """Whole replies are decided before anything is sent: enforce, data replies on a guarded task (they
        are checked first), and guarded replies that are not one plain text (several choices, logprobs)."""
        if self.enforce or self.reply.tool_mode != "none":
            return True
        return self.guarded and (self.reply.is_data or self.params.n > 1 or self.params.logprobs is not None)

    async def deltas(self):
        """The engine's deltas, each applied to its choice; yields (choice, text, steps)."""
        adapter = self.slot.ref if self.slot is not None else None
        self.s.metrics.engine_requests.labels(self.label).inc()
        # aclosing: when this generator is closed (output filter tripped, client gone), the engine's is
        # closed at once, which aborts the request in the engine, rather than whenever it is collected.
        async with asyncio.timeout(self.s.cfg.limits.request_timeout_s), contextlib.aclosing(
                self.s.engine.generate(self.ctx.request_id, self.prompt_ids, self.params, adapter)) as gen:
            async for d in gen:
                if self.ttft is None and (d.text or d.completion_tokens):
                    self.ttft = time.time() - self.t0
                c = self.choices[d.index]
                c.parts.append(d.text)
                c.n_out = d.completion_tokens
                if d.finish_reason:
                    c.finish = d.finish_reason
                if c.steps is not None and d.logprobs:
                    c.steps.extend(d.logprobs)
                yield c, d.text, d.logprobs

    async def collect(self) -> None:
        """Generate every choice whole, then decide each."""
        async for _ in self.deltas():
            pass
        for c in self.choices:
            await self._decide(c)
        self._summarise()

    async def _decide(self, c: Choice) -> None:
        raw = c.raw = "".join(c.parts)
        f = c.filter
        filtered = f.whole(raw) if f is not None else raw
        if f is not None and f.tripped:
            c.sent, c.finish, c.keep_logprobs = self.s.pipeline.output.leak_reply(), "content_filter", False
            return
        if self.reply.is_data and await self._decide_data(c, raw, filtered):
            return
        sent = await self.s.pipeline.run_post(self.ctx, raw)
        c.decision = self.ctx.report.pop("output", None)
        if self.enforce:
            if sent != raw and c.finish == "length":
                c.finish = "stop"  # a replacement (script or fallback) is a complete reply
        else:
            sent = filtered
        c.sent, c.keep_logprobs = sent, sent == raw

    async def _decide_data(self, c: Choice, raw: str, filtered: str) -> bool:
        """A JSON or tool-call reply, checked, not replaced. False: it is prose after all (auto found no call
        and no JSON was asked for)."""
        r = self.reply
        calls, content = r.read_calls(filtered) if r.read_calls is not None else ([], filtered)
        kind = "tool_calls" if calls or r.tool_mode in ("named", "required") else "json" if r.schema is not None else None
        if kind is None:
            return False
        # what it says, unescaped: read by the leak check and the output scanners (prose beside calls: below)
        said = readable([k.arguments for k in calls] if kind == "tool_calls" else [filtered]) if self.guarded else ""
        if c.filter is not None and c.filter.trip_on(said):  # a leak the JSON escapes hid from the filter
            c.sent, c.finish, c.keep_logprobs = self.s.pipeline.output.leak_reply(), "content_filter", False
            return True
        c.calls, c.sent, c.keep_logprobs = calls, content, filtered == raw
        if calls and (r.tool_mode == "auto" or (r.tool_mode == "required" and c.finish == "stop")):
            c.finish = "tool_calls"  # OpenAI's rule: "stop" for a named call
        if not self.guarded:
            return True
        t0 = time.perf_counter()  # the checks and the scan count as the guard's time, as compliance's does
        if kind == "tool_calls":
            verdict = await asyncio.to_thread(check_calls, [(k.name, k.arguments) for k in calls], r.offered,
                                              r.allowed)
            if not calls and verdict.valid:
                verdict = Verdict(False, "no tool call in the reply")
        else:
            verdict = await asyncio.to_thread(check_json, filtered, r.schema)
        if verdict.valid:  # well formed; now what it says
            if reason := await self.s.pipeline.screen(self.ctx, said):
                verdict = Verdict(False, reason)
        mode = "enforce" if self.enforce else "monitor"
        c.decision = {"mode": mode, "outcome": outcomes.PASSED if verdict.valid else outcomes.INVALID,
                      "kind": kind, **verdict.report(), "latency_ms": round((time.perf_counter() - t0) * 1000, 2)}
        if mode == "enforce" and not verdict.valid:
            c.sent, c.calls, c.finish, c.keep_logprobs = None, [], "content_filter", False
        elif kind == "tool_calls" and content and content.strip():
            await self._decide_prose_beside(c, content)
        return True

    async def _decide_prose_beside(self, c: Choice, content: str) -> None:
        """Prose the model wrote beside its calls (auto) goes through compliance like any prose reply."""
        sent = await self.s.pipeline.run_post(self.ctx, content)
        c.decision["content"] = self.ctx.report.pop("output", None)
        if self.enforce and sent != content:
            c.sent, c.keep_logprobs = sent, False

    def _summarise(self) -> None:
        """The request's report: the most severe choice's decision as `output` (what the outcome label and
        the audit record's `script`/`fallback`/`check` show), and with several choices each one's under
        `choices`."""
        decided = [c for c in self.choices if c.decision is not None]
        if decided:
            self.ctx.report["output"] = max(decided, key=lambda c: severity(c.decision)).decision
        if len(self.choices) > 1 and self.guarded:
            self.ctx.report["choices"] = [{"index": c.index, "outcome": choice_outcome(c), **(c.decision or {}),
                                           "sent": c.sent} for c in self.choices]
        filters = [c.filter for c in self.choices if c.filter is not None]
        if any(f.tripped or f.redacted for f in filters):
            self.ctx.report["reply"] = {"stopped": next((f.tripped for f in filters if f.tripped), None),
                                        "redacted": sorted(set().union(*(f.redacted for f in filters)))}

    async def as_written(self):
        """Choices streamed as the model writes them; a guarded one (a single choice, monitor mode or no
        compliance) through the output filter. Yields (choice, text to send, logprob steps or None)."""
        c = self.choices[0]
        f = c.filter if len(self.choices) == 1 else None
        sent = []
        async with contextlib.aclosing(self.deltas()) as deltas:
            async for choice, piece, steps in deltas:
                if f is None:
                    yield choice, piece, steps
                elif out := f.feed(piece):
                    sent.append(out)
                    yield c, out, None
                if f is not None and f.tripped:
                    break  # closing the engine's stream aborts the generation
        for choice in self.choices:
            choice.raw = choice.sent = "".join(choice.parts)
        if f is not None:
            if f.tripped:  # the stream stops where it was: what went out is all that goes out
                c.sent, c.finish = "".join(sent), "content_filter"
            else:
                if tail := f.finish():
                    sent.append(tail)
                    yield c, tail, None
                c.sent = "".join(sent)
                if self.s.pipeline.post:  # monitor: decisions are recorded, the reply stands
                    await self.s.pipeline.run_post(self.ctx, c.raw)
                    c.decision = self.ctx.report.pop("output", None)
        self._summarise()

    def usage(self) -> Usage:
        p, out = len(self.prompt_ids), sum(c.n_out for c in self.choices)
        return Usage(prompt_tokens=p, completion_tokens=out, total_tokens=p + out)

    def extra(self) -> dict:
        # system_fingerprint names the exact adapter load that served the request (task@id); version says
        # whether that was the task's stable adapter or its canary.
        extra = {"system_fingerprint": self.ctx.adapter, "version": self.ctx.version}
        if self.ctx.citations:
            extra["citations"] = self.ctx.citations
        return extra | ({"guardrails": self.ctx.report} if self.ctx.report else {})

    async def record(self, status: int) -> None:
        ctx, first = self.ctx, self.choices[0]
        outcome = guardrail_outcome(ctx.report)
        out, inp = ctx.report.get("output") or {}, ctx.report.get("input") or {}
        if inp.get("redacted"):  # counted apart: the outcome label shows the compliance decision instead
            self.s.metrics.redactions.labels(self.label).inc()
        guard_ms = [v for v in (inp.get("latency_ms"), out.get("latency_ms")) if v is not None]
        self.s.metrics.observe(RequestRecord(
            time.time(), self.label, status, first.finish, len(self.prompt_ids), self.usage().completion_tokens,
            time.time() - self.t0, self.ttft, guardrail=outcome, stage=out.get("stage"),
            compliance_score=out.get("score"),
            fallback=f"{out['fallback_stage']}/{out['fallback_variant']}" if out.get("outcome") == "fallback" else None,
            guard_ms=sum(guard_ms) if guard_ms else None, version=ctx.version))
        choices = [{"index": c.index, "outcome": choice_outcome(c), "raw": c.raw, "sent": sent_text(c),
                    "decision": c.decision} for c in self.choices] if len(self.choices) > 1 else None
        await audit_record(self.s.pipeline, ctx, outcome=outcome if status == 200 else outcomes.error(status),
                           raw=first.raw, sent=sent_text(first), t0=self.t0, ttft=self.ttft, choices=choices)

    def failed(self, reason: str) -> None:
        """The run ended without a reply (client gone, error): choices still open end for `reason`."""
        for c in self.choices:
            if c.finish in ("error", None) or reason == "client_disconnected":
                c.finish = reason


# How much a decision changed the reply, least first: the request's outcome is its most severe choice's.
SEVERITY = (outcomes.PASSED, outcomes.MONITOR_SCRIPT, outcomes.MONITOR_FALLBACK, outcomes.MONITOR_INVALID,
            outcomes.SCRIPT, outcomes.FALLBACK, outcomes.INVALID, outcomes.LEAK)


def decision_outcome(decision: dict) -> str:
    out = decision["outcome"]
    return out if out == outcomes.PASSED or decision["mode"] == "enforce" else outcomes.monitored(out)


def severity(decision: dict) -> int:
    return SEVERITY.index(decision_outcome(decision))


def choice_outcome(c: Choice) -> str:
    if c.filter is not None and c.filter.tripped:
        return outcomes.LEAK
    return decision_outcome(c.decision) if c.decision is not None else outcomes.PASSED


def sent_text(c: Choice) -> str | None:
    """What the client got, as one text for the audit record: the content, or the calls as JSON."""
    if c.calls:
        return json.dumps([k.wire() for k in c.calls], ensure_ascii=False)
    return c.sent


async def audit_record(pipeline, ctx: ChatContext, *, outcome: str, raw: str | None, sent: str | None, t0: float,
                       ttft: float | None = None, choices: list[dict] | None = None) -> None:
    """One record per guarded request, keyed by request id; written (redacted) off the event loop."""
    if not pipeline.audits(ctx.task):
        return
    out = ctx.report.get("output") or {}
    inp = ctx.report.get("input") or {}
    record = {
        "request_id": ctx.request_id, "ts": time.time(), "task": ctx.task, "session_id": ctx.session_id,
        "version": ctx.version, "adapter": ctx.adapter,
        "api_key_id": ctx.principal,
        "stage": out.get("stage") or ctx.dialogue_stage, "outcome": outcome, "input": inp,
        "retrieved": ctx.report.get("retrieved", []), "prompt": ctx.messages, "raw_generation": raw, "sent": sent,
        "reply": ctx.report.get("reply"),
        # Compliance's decision with its text: what went out (enforce) or would have (monitor; badcases pairs it).
        "script": ({"id": out["script_id"], "score": out["score"], "text": out.get("sent")}
                   if out.get("outcome") == "script" else None),
        "fallback": ({"stage": out["fallback_stage"], "variant": out["fallback_variant"], "score": out["score"],
                      "text": out.get("sent")} if out.get("outcome") == "fallback" else None),
        "latency_ms": {"input": inp.get("latency_ms"), "retrieval": ctx.report.get("retrieval_ms"),
                       "compliance": out.get("latency_ms"),
                       "first_token": round(ttft * 1000, 1) if ttft is not None else None,
                       "total": round((time.time() - t0) * 1000, 1)},
    }
    if out.get("kind"):  # a JSON or tool-call reply: its check
        record["check"] = {k: out.get(k) for k in ("kind", "valid", "error")}
    if choices is not None:
        record["choices"] = choices
    await pipeline.audit.write(record)


def guardrail_outcome(report: dict) -> str:
    """A bounded label (guardrails.outcomes): passed, redacted, script, fallback, invalid, monitor_*, leak."""
    if (report.get("reply") or {}).get("stopped"):
        return outcomes.LEAK
    out = report.get("output")
    if out and out["outcome"] != outcomes.PASSED:
        return decision_outcome(out)
    return outcomes.REDACTED if report.get("input", {}).get("redacted") else outcomes.PASSED


class HeldStream(StreamingResponse):
    """An event stream that owns its request's pin and admission slot: they are released when the response
    ends, even one that ends before its body generator ever started (the client gone at once)."""

    def __init__(self, events, stack: contextlib.AsyncExitStack):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._stack = stack

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            # A client gone while `send` waited leaves the body generator suspended: close it now (engine
            # abort, its record) before the pin and slot go, not whenever it is collected.
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self._stack.aclose()  # a no-op when the stream closed it already


def generation_error(exc: Exception) -> APIError:
    if isinstance(exc, EngineRefused):
        return APIError(400, str(exc), code="invalid_request")
    if isinstance(exc, TimeoutError):
        return APIError(504, "generation timed out", code="timeout")
    if isinstance(exc, EngineDead):
        return APIError(503, str(exc), code="engine_dead")
    return APIError(500, f"generation failed: {type(exc).__name__}", code="generation_failed")


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
