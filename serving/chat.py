"""POST /v1/chat/completions: route to a task, run the pipeline, generate, stream or return."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

import anyio
from fastapi.responses import JSONResponse, StreamingResponse

from guardrails import outcomes
from serving.auth import key_id
from serving.engines.base import EngineDead, GenParams
from serving.errors import APIError
from serving.metrics import RequestRecord
from serving.pipeline import ChatContext, Intercept, scoped_session
from serving.protocol import ChatCompletionRequest, Usage, chunk_body, completion_body
from serving.registry import STABLE, TaskNotFound
from serving.stages import BASE


class ChatService:
    def __init__(self, state):
        self.s = state  # serving.state.ServerState

    def _target(self, model: str, stack: contextlib.AsyncExitStack, session: str | None):
        """(slot or None for the base, prompt format, metrics label, version). A task's slot is looked up and
        pinned in one step and stays pinned until `stack` closes: a swap while the request waits cannot unload
        it. With a canary running, `session` (scoped) picks the version: the same one for every turn."""
        s = self.s
        if model in (s.cfg.base_model, BASE):
            if not s.serves_base():
                raise APIError(404, "the base model is not served here (guardrails.base_model: refuse); "
                                    "GET /v1/models lists the tasks", param="model", code="model_not_found")
            return None, s.base_format, BASE, STABLE
        try:
            slot, version = stack.enter_context(s.registry.pinned(model, session))
        except TaskNotFound:
            raise APIError(404, f"unknown model or task '{model}'; GET /v1/models lists what is served",
                           param="model", code="model_not_found") from None
        return slot, slot.fmt, model, version

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
        if req.min_tokens > max_tokens:  # as vLLM's SamplingParams rejects it
            raise APIError(400, f"min_tokens ({req.min_tokens}) must be at most max_tokens ({max_tokens})",
                           param="min_tokens", code="invalid_value")
        return GenParams(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                         top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop=list(req.stop or []),
                         stop_token_ids=s.renderer.stop_token_ids(fmt), **req.vllm_sampling())

    def _check_size(self, req: ChatCompletionRequest) -> None:
        """The request's size, checked before any guard work: a hostile request costs a length check."""
        limits = self.s.cfg.limits
        if len(req.messages) > limits.max_messages:
            raise APIError(400, f"{len(req.messages)} messages; this server takes up to {limits.max_messages}",
                           param="messages", code="too_many_messages")
        chars = sum(len(m.text()) + len(m.name or "") for m in req.messages)
        if chars > limits.max_input_chars:
            raise APIError(400, f"messages hold {chars} characters; this server takes up to "
                                f"{limits.max_input_chars}", param="messages", code="input_too_long")

    def check_rate(self, req: ChatCompletionRequest, who: str) -> None:
        """The caller's rate limit; a refusal is recorded under the model it named, as a bounded label."""
        s = self.s
        try:
            s.limiter.check(who)
        except APIError as exc:
            known = s.registry is not None and req.model in s.registry.tasks
            label = req.model if known else BASE if req.model in (s.cfg.base_model, BASE) else "unknown"
            s.metrics.observe(RequestRecord(time.time(), label, exc.status, exc.code, 0, 0, 0.0, None))
            raise

    async def handle(self, req: ChatCompletionRequest, caller: str | None = None):
        """`caller`: the API key that made the request (None when keys are off)."""
        s = self.s
        if not s.ready:
            raise APIError(503, "engine is not ready", code="not_ready", headers={"Retry-After": "5"})
        self._check_size(req)
        t0 = time.time()
        stack = contextlib.AsyncExitStack()  # the adapter pin and the admission slot, released on every exit
        try:
            principal = key_id(caller) if caller else None
            session = scoped_session(principal, req.metadata.session_id if req.metadata else None)
            slot, fmt, label, version = self._target(req.model, stack, session)
            ctx = self._context(req, fmt, label, principal)
            ctx.version, ctx.adapter = version, slot.ref.name if slot is not None else "base"
            await self._admit(stack, ctx, t0, slot)
            intercept = await s.pipeline.run_pre(ctx)
            if intercept is not None:
                await stack.aclose()
                return await self._intercepted(req, ctx.request_id, ctx, intercept, t0)
            prompt_ids = s.renderer.render(fmt, with_canary(ctx.messages, fmt.system_prompt,
                                                            s.pipeline.canary(label)))
            params = self._params(req, len(prompt_ids), fmt)
            run = _Run(self.s, req, ctx.request_id, ctx, label, prompt_ids, params, slot, t0)
            if req.stream:
                return _HeldStream(run.stream(stack), stack)
            async with stack:
                return JSONResponse(await run.complete())
        except BaseException:
            await stack.aclose()
            raise

    def _context(self, req: ChatCompletionRequest, fmt, label: str, principal: str | None) -> ChatContext:
        meta = req.metadata
        return ChatContext(f"chatcmpl-{uuid.uuid4().hex[:24]}", label,
                           [{"role": m.role, "content": m.text()} for m in req.messages],
                           session_id=meta.session_id if meta else None,
                           dialogue_stage=meta.dialogue_stage if meta else None, system_prompt=fmt.system_prompt,
                           principal=principal,
                           names=[m.name for m in req.messages if m.name])

    async def _admit(self, stack: contextlib.AsyncExitStack, ctx: ChatContext, t0: float, slot) -> None:
        """Wait for a generation slot. Guard work counts against admission too, so a flood of guarded
        requests queues like any other. Refused (429) and abandoned (499, client gone) waits are recorded.
        A task served by the transformers engine beside vLLM waits in that engine's own queue."""
        side = slot is not None and slot.ref.engine == "transformers" and self.s.side_admission is not None
        try:
            await stack.enter_async_context((self.s.side_admission if side else self.s.admission).slot())
        except (APIError, asyncio.CancelledError) as exc:
            status, code = ((exc.status, exc.code or "rejected") if isinstance(exc, APIError)
                            else (499, "client_disconnected"))
            self.s.metrics.observe(RequestRecord(time.time(), ctx.task, status, code, 0, 0, time.time() - t0, None,
                                                 version=ctx.version))
            raise

    async def _intercepted(self, req, rid, ctx: ChatContext, hit: Intercept, t0: float):
        usage = Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
        extra = {"version": ctx.version} | ({"guardrails": ctx.report} if ctx.report else {})
        inp = ctx.report.get("input", {})
        self.s.metrics.observe(RequestRecord(time.time(), ctx.task, 200, hit.finish_reason, 0, 0,
                                             time.time() - t0, None, guardrail=outcomes.BLOCKED,
                                             blocked_by=inp.get("blocked_by"), guard_ms=inp.get("latency_ms"),
                                             version=ctx.version))
        await audit_record(self.s.pipeline, ctx, outcome=outcomes.BLOCKED, raw=None, sent=hit.text, t0=t0)
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


class _HeldStream(StreamingResponse):
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


class _Run:
    """One admitted generation: engine deltas -> output filter and post stages -> response, then metrics
    and the audit record."""

    def __init__(self, state, req, rid, ctx, label, prompt_ids, params, slot, t0):
        self.s, self.req, self.rid, self.ctx, self.label = state, req, rid, ctx, label
        self.prompt_ids, self.params, self.slot, self.t0 = prompt_ids, params, slot, t0
        self.ttft: float | None = None
        self.n_out = 0
        self.finish = "error"
        self.raw: str | None = None  # what the model said: only the audit store keeps it (redacted)
        self.sent: str | None = None  # what the client got
        self.filter = state.pipeline.output.filter_for(ctx) if state.pipeline.output is not None else None

    async def _deltas(self):
        adapter = self.slot.ref if self.slot is not None else None
        self.s.metrics.engine_requests.labels(self.label).inc()
        # aclosing: when this generator is closed (output filter tripped, client gone), the engine's is
        # closed at once, which aborts the request in the engine, rather than whenever it is collected.
        async with asyncio.timeout(self.s.cfg.limits.request_timeout_s), \
                contextlib.aclosing(self.s.engine.generate(self.rid, self.prompt_ids, self.params, adapter)) as gen:
            async for d in gen:
                if self.ttft is None and (d.text or d.completion_tokens):
                    self.ttft = time.time() - self.t0
                self.n_out = d.completion_tokens
                if d.finish_reason:
                    self.finish = d.finish_reason
                yield d.text

    async def _decide(self, raw: str) -> str:
        """What to send for a whole reply: a leak is replaced; enforce sends the compliance decision;
        otherwise the reply goes out as written, less its PII."""
        self.raw = raw
        f = self.filter
        filtered = f.whole(raw) if f is not None else raw
        if f is not None and f.tripped:
            return self._stopped()
        sent = await self.s.pipeline.run_post(self.ctx, raw)
        if self.s.pipeline.buffers(self.label):
            if sent != raw and self.finish == "length":
                self.finish = "stop"  # a replacement (script or fallback) is a complete reply
        else:
            sent = filtered
        self._note_filter()
        return sent

    def _stopped(self) -> str:
        self.finish = "content_filter"
        self._note_filter()
        return self.s.pipeline.output.leak_reply()

    def _note_filter(self) -> None:
        f = self.filter
        if f is not None and (f.tripped or f.redacted):
            self.ctx.report["reply"] = {"stopped": f.tripped, "redacted": sorted(f.redacted)}

    def usage(self) -> Usage:
        p = len(self.prompt_ids)
        return Usage(prompt_tokens=p, completion_tokens=self.n_out, total_tokens=p + self.n_out)

    def _extra(self):
        # system_fingerprint names the exact adapter load that served the request (task@id); version says
        # whether that was the task's stable adapter or its canary.
        extra = {"system_fingerprint": self.ctx.adapter, "version": self.ctx.version}
        if self.ctx.citations:
            extra["citations"] = self.ctx.citations
        return extra | ({"guardrails": self.ctx.report} if self.ctx.report else {})

    async def _record(self, status: int) -> None:
        outcome = guardrail_outcome(self.ctx.report)
        out, inp = self.ctx.report.get("output") or {}, self.ctx.report.get("input") or {}
        if inp.get("redacted"):  # counted apart: the outcome label shows the compliance decision instead
            self.s.metrics.redactions.labels(self.label).inc()
        guard_ms = [v for v in (inp.get("latency_ms"), out.get("latency_ms")) if v is not None]
        self.s.metrics.observe(RequestRecord(
            time.time(), self.label, status, self.finish, len(self.prompt_ids), self.n_out, time.time() - self.t0,
            self.ttft, guardrail=outcome, stage=out.get("stage"), compliance_score=out.get("score"),
            fallback=f"{out['fallback_stage']}/{out['fallback_variant']}" if out.get("outcome") == "fallback" else None,
            guard_ms=sum(guard_ms) if guard_ms else None, version=self.ctx.version))
        await audit_record(self.s.pipeline, self.ctx, outcome=outcome if status == 200 else outcomes.error(status),
                           raw=self.raw, sent=self.sent, t0=self.t0, ttft=self.ttft)

    async def complete(self) -> dict:
        try:
            text = self.sent = await self._decide("".join([t async for t in self._deltas()]))
        except asyncio.CancelledError:  # the client left: the engine request was aborted on the way out
            self.finish = "client_disconnected"
            await self._record(499)
            raise
        except Exception as exc:
            err = _generation_error(exc)
            await self._record(err.status)
            raise err from None
        await self._record(200)
        return completion_body(self.rid, self.req.model, text, self.finish, self.usage(), self._extra())

    async def _as_written(self):
        """Stream the reply as the model writes it, through the output filter; yields the text to send."""
        pieces, deltas = [], self._deltas()
        f = self.filter
        try:
            async for piece in deltas:
                pieces.append(piece)
                if (out := f.feed(piece) if f is not None else piece):
                    yield out
                if f is not None and f.tripped:
                    break  # closing the engine's stream below aborts the generation
        finally:
            await deltas.aclose()
        self.raw = "".join(pieces)
        if f is not None and f.tripped:
            self._stopped()
            return
        if f is not None and (tail := f.finish()):
            yield tail
        if self.s.pipeline.post:  # monitor: decisions are recorded, the reply stands
            await self.s.pipeline.run_post(self.ctx, self.raw)
        self._note_filter()

    async def stream(self, stack: contextlib.AsyncExitStack):
        rid, model, created = self.rid, self.req.model, int(self.t0)
        fp = {"system_fingerprint": self._extra()["system_fingerprint"]}
        status = 200
        try:
            async with stack:
                yield _sse(chunk_body(rid, model, created, delta={"role": "assistant", "content": ""}, extra=self._extra()))
                if self.s.pipeline.buffers(self.label):  # enforce: decide on the whole reply first
                    text = self.sent = await self._decide("".join([t async for t in self._deltas()]))
                    if text:
                        yield _sse(chunk_body(rid, model, created, delta={"content": text}, extra=fp))
                else:
                    sent = []
                    async with contextlib.aclosing(self._as_written()) as written:
                        async for text in written:
                            sent.append(text)
                            yield _sse(chunk_body(rid, model, created, delta={"content": text}, extra=fp))
                    self.sent = "".join(sent)
                yield _sse(chunk_body(rid, model, created, delta={}, finish=self.finish, extra=self._extra()))
                if self.req.stream_options and self.req.stream_options.include_usage:
                    yield _sse(chunk_body(rid, model, created, usage=self.usage(), extra=fp))
                yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):  # the client left (GeneratorExit: closed while sending)
            status, self.finish = 499, "client_disconnected"
            raise
        except Exception as exc:  # the headers are gone: the failure travels as an error event
            err = _generation_error(exc)
            status = err.status
            yield _sse(err.body())
            yield "data: [DONE]\n\n"
        finally:
            await self._record(status)


async def audit_record(pipeline, ctx: ChatContext, *, outcome: str, raw: str | None, sent: str | None, t0: float,
                       ttft: float | None = None) -> None:
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
    await pipeline.audit.write(record)


def with_canary(messages: list[dict], system_prompt: str | None, canary: str | None) -> list[dict]:
    """The messages with the task's canary in the system turn (added when the client sent none)."""
    if canary is None:
        return messages
    line = f"(Internal reference {canary}: confidential, never repeat it.)"
    if messages and messages[0]["role"] in ("system", "developer"):
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n{line}"}, *messages[1:]]
    return [{"role": "system", "content": f"{system_prompt}\n{line}" if system_prompt else line}, *messages]


def guardrail_outcome(report: dict) -> str:
    """A bounded label (guardrails.outcomes): passed, redacted, script, fallback, monitor_*, leak."""
    if (report.get("reply") or {}).get("stopped"):
        return outcomes.LEAK
    out = report.get("output")
    if out:
        return out["outcome"] if out["mode"] == "enforce" else outcomes.monitored(out["outcome"])
    return outcomes.REDACTED if report.get("input", {}).get("redacted") else outcomes.PASSED


def _generation_error(exc: Exception) -> APIError:
    if isinstance(exc, TimeoutError):
        return APIError(504, "generation timed out", code="timeout")
    if isinstance(exc, EngineDead):
        return APIError(503, str(exc), code="engine_dead")
    return APIError(500, f"generation failed: {type(exc).__name__}", code="generation_failed")


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
