"""POST /v1/chat/completions: route to a task, run the pipeline, generate, stream or return."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from fastapi.responses import JSONResponse, StreamingResponse

from serving.engines.base import EngineDead, GenParams
from serving.errors import APIError
from serving.metrics import RequestRecord
from serving.pipeline import ChatContext, Intercept
from serving.protocol import ChatCompletionRequest, Usage, chunk_body, completion_body


class ChatService:
    def __init__(self, state):
        self.s = state  # serving.app.ServerState

    def _target(self, model: str):
        """(slot or None for the base, prompt format, metrics label)."""
        s = self.s
        if model in (s.cfg.base_model, "base"):
            return None, s.base_format, "base"
        slot = s.registry.tasks.get(model)
        if slot is None:
            raise APIError(404, f"unknown model or task '{model}'; GET /v1/models lists what is served",
                           param="model", code="model_not_found")
        return slot, slot.fmt, model

    def _params(self, req: ChatCompletionRequest, prompt_len: int, fmt) -> GenParams:
        s = self.s
        ctx_len, cap = s.cfg.max_model_len, s.cfg.limits.max_tokens_cap
        if prompt_len >= ctx_len:
            raise APIError(400, f"prompt is {prompt_len} tokens; the context window is {ctx_len}",
                           param="messages", code="context_length_exceeded")
        requested = req.token_limit
        if requested is not None and requested > cap:
            raise APIError(400, f"max_tokens {requested} exceeds this server's cap of {cap}", param="max_tokens",
                           code="max_tokens_too_large")
        max_tokens = requested or min(cap, ctx_len - prompt_len)
        if prompt_len + max_tokens > ctx_len:
            raise APIError(400, f"prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the context "
                                f"window of {ctx_len}", param="max_tokens", code="context_length_exceeded")
        return GenParams(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                         top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop=list(req.stop or []),
                         stop_token_ids=s.renderer.stop_token_ids(fmt))

    async def handle(self, req: ChatCompletionRequest):
        s = self.s
        if not s.ready:
            raise APIError(503, "engine is not ready", code="not_ready", headers={"Retry-After": "5"})
        t0 = time.time()
        slot, fmt, label = self._target(req.model)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        meta = req.metadata
        ctx = ChatContext(rid, label, [{"role": m.role, "content": m.text()} for m in req.messages],
                          session_id=meta.session_id if meta else None,
                          dialogue_stage=meta.dialogue_stage if meta else None, system_prompt=fmt.system_prompt)
        intercept = await s.pipeline.run_pre(ctx)
        if intercept is not None:
            return self._intercepted(req, rid, ctx, intercept, t0)
        prompt_ids = s.renderer.render(fmt, ctx.messages)
        params = self._params(req, len(prompt_ids), fmt)

        stack = contextlib.AsyncExitStack()
        try:
            await stack.enter_async_context(s.admission.slot())
        except APIError as exc:
            s.metrics.observe(RequestRecord(time.time(), label, exc.status, exc.code or "rejected", len(prompt_ids), 0,
                                            time.time() - t0, None, guard_ms=ctx.report.get("input", {}).get("latency_ms")))
            raise
        try:
            if slot is not None:
                stack.enter_context(s.registry.pin(slot))
            run = _Run(self.s, req, rid, ctx, label, prompt_ids, params, slot, t0)
            if req.stream:
                return StreamingResponse(run.stream(stack), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            async with stack:
                return JSONResponse(await run.complete())
        except BaseException:
            await stack.aclose()
            raise

    def _intercepted(self, req, rid, ctx: ChatContext, hit: Intercept, t0: float):
        usage = Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
        extra = {"guardrails": ctx.report} if ctx.report else None
        inp = ctx.report.get("input", {})
        self.s.metrics.observe(RequestRecord(time.time(), ctx.task, 200, hit.finish_reason, 0, 0,
                                             time.time() - t0, None, guardrail="blocked",
                                             blocked_by=inp.get("blocked_by"), guard_ms=inp.get("latency_ms")))
        audit_record(self.s.pipeline, ctx, outcome="blocked", raw=None, sent=hit.text, t0=t0)
        if not req.stream:
            return JSONResponse(completion_body(rid, req.model, hit.text, hit.finish_reason, usage, extra))
        created = int(t0)

        async def events():
            yield _sse(chunk_body(rid, req.model, created, delta={"role": "assistant", "content": hit.text}, extra=extra))
            yield _sse(chunk_body(rid, req.model, created, delta={}, finish=hit.finish_reason))
            if req.stream_options and req.stream_options.include_usage:
                yield _sse(chunk_body(rid, req.model, created, usage=usage))
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")


class _Run:
    """One admitted generation: engine deltas -> (post stages) -> response, with metrics at the end."""

    def __init__(self, state, req, rid, ctx, label, prompt_ids, params, slot, t0):
        self.s, self.req, self.rid, self.ctx, self.label = state, req, rid, ctx, label
        self.prompt_ids, self.params, self.slot, self.t0 = prompt_ids, params, slot, t0
        self.ttft: float | None = None
        self.n_out = 0
        self.finish = "error"
        self.raw: str | None = None  # what the model said
        self.sent: str | None = None  # what the client got

    async def _deltas(self):
        adapter = self.slot.ref if self.slot is not None else None
        self.s.metrics.engine_requests.labels(self.label).inc()
        async with asyncio.timeout(self.s.cfg.limits.request_timeout_s):
            async for d in self.s.engine.generate(self.rid, self.prompt_ids, self.params, adapter):
                if self.ttft is None and (d.text or d.completion_tokens):
                    self.ttft = time.time() - self.t0
                self.n_out = d.completion_tokens
                if d.finish_reason:
                    self.finish = d.finish_reason
                yield d.text

    async def _decide(self, raw: str) -> str:
        sent = await self.s.pipeline.run_post(self.ctx, raw)
        if sent != raw and self.finish == "length":
            self.finish = "stop"  # a replacement (script or fallback) is a complete reply
        return sent

    def usage(self) -> Usage:
        p = len(self.prompt_ids)
        return Usage(prompt_tokens=p, completion_tokens=self.n_out, total_tokens=p + self.n_out)

    def _extra(self):
        # system_fingerprint names the exact adapter load that served the request (task@id).
        extra = {"system_fingerprint": self.slot.ref.name if self.slot is not None else "base"}
        if self.ctx.citations:
            extra["citations"] = self.ctx.citations
        return extra | ({"guardrails": self.ctx.report} if self.ctx.report else {})

    def _record(self, status: int) -> None:
        outcome = guardrail_outcome(self.ctx.report)
        out, inp = self.ctx.report.get("output") or {}, self.ctx.report.get("input") or {}
        if inp.get("redacted"):  # counted apart: the outcome label shows the compliance decision instead
            self.s.metrics.redactions.labels(self.label).inc()
        guard_ms = [v for v in (inp.get("latency_ms"), out.get("latency_ms")) if v is not None]
        self.s.metrics.observe(RequestRecord(
            time.time(), self.label, status, self.finish, len(self.prompt_ids), self.n_out, time.time() - self.t0,
            self.ttft, guardrail=outcome, stage=out.get("stage"), compliance_score=out.get("score"),
            fallback=f"{out['fallback_stage']}/{out['fallback_variant']}" if out.get("outcome") == "fallback" else None,
            guard_ms=sum(guard_ms) if guard_ms else None))
        audit_record(self.s.pipeline, self.ctx, outcome=outcome if status == 200 else f"error_{status}",
                     raw=self.raw, sent=self.sent, t0=self.t0, ttft=self.ttft)

    async def complete(self) -> dict:
        try:
            self.raw = "".join([t async for t in self._deltas()])
            text = self.sent = await self._decide(self.raw)
        except Exception as exc:
            err = _generation_error(exc)
            self._record(err.status)
            raise err from None
        self._record(200)
        return completion_body(self.rid, self.req.model, text, self.finish, self.usage(), self._extra())

    async def stream(self, stack: contextlib.AsyncExitStack):
        rid, model, created = self.rid, self.req.model, int(self.t0)
        fp = {"system_fingerprint": self._extra()["system_fingerprint"]}
        status = 200
        try:
            async with stack:
                yield _sse(chunk_body(rid, model, created, delta={"role": "assistant", "content": ""}, extra=self._extra()))
                if self.s.pipeline.buffers(self.label):  # enforce: decide on the whole reply first
                    self.raw = "".join([t async for t in self._deltas()])
                    text = self.sent = await self._decide(self.raw)
                    if text:
                        yield _sse(chunk_body(rid, model, created, delta={"content": text}, extra=fp))
                else:
                    pieces = []
                    async for piece in self._deltas():
                        if piece:
                            pieces.append(piece)
                            yield _sse(chunk_body(rid, model, created, delta={"content": piece}, extra=fp))
                    self.raw = self.sent = "".join(pieces)
                    if self.s.pipeline.post:  # monitor: decisions are recorded, the raw reply stands
                        await self.s.pipeline.run_post(self.ctx, self.raw)
                yield _sse(chunk_body(rid, model, created, delta={}, finish=self.finish, extra=self._extra()))
                if self.req.stream_options and self.req.stream_options.include_usage:
                    yield _sse(chunk_body(rid, model, created, usage=self.usage(), extra=fp))
                yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            status, self.finish = 499, "client_disconnected"
            raise
        except Exception as exc:  # the headers are gone: the failure travels as an error event
            err = _generation_error(exc)
            status = err.status
            yield _sse(err.body())
            yield "data: [DONE]\n\n"
        finally:
            self._record(status)


def audit_record(pipeline, ctx: ChatContext, *, outcome: str, raw: str | None, sent: str | None, t0: float,
                 ttft: float | None = None) -> None:
    """One record per guarded request, keyed by request id; a synchronous, fsynced SQLite insert."""
    if not pipeline.audits(ctx.task):
        return
    out = ctx.report.get("output") or {}
    inp = ctx.report.get("input") or {}
    record = {
        "request_id": ctx.request_id, "ts": time.time(), "task": ctx.task, "session_id": ctx.session_id,
        "stage": out.get("stage") or ctx.dialogue_stage, "outcome": outcome, "input": inp,
        "retrieved": ctx.report.get("retrieved", []), "prompt": ctx.messages, "raw_generation": raw, "sent": sent,
        "script": {"id": out["script_id"], "score": out["score"]} if out.get("outcome") == "script" else None,
        "fallback": ({"stage": out["fallback_stage"], "variant": out["fallback_variant"], "score": out["score"]}
                     if out.get("outcome") == "fallback" else None),
        "latency_ms": {"input": inp.get("latency_ms"), "retrieval": ctx.report.get("retrieval_ms"),
                       "compliance": out.get("latency_ms"),
                       "first_token": round(ttft * 1000, 1) if ttft is not None else None,
                       "total": round((time.time() - t0) * 1000, 1)},
    }
    pipeline.audit.write(record)


def guardrail_outcome(report: dict) -> str:
    """A bounded label: none, redacted, script, fallback, monitor_script, monitor_fallback."""
    out = report.get("output")
    if out:
        return out["outcome"] if out["mode"] == "enforce" else f"monitor_{out['outcome']}"
    return "redacted" if report.get("input", {}).get("redacted") else "none"


def _generation_error(exc: Exception) -> APIError:
    if isinstance(exc, TimeoutError):
        return APIError(504, "generation timed out", code="timeout")
    if isinstance(exc, EngineDead):
        return APIError(503, str(exc), code="engine_dead")
    return APIError(500, f"generation failed: {type(exc).__name__}", code="generation_failed")


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
