"""POST /v1/chat/completions: route to a task, run the pipeline, generate, stream or return."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

from fastapi.responses import JSONResponse, StreamingResponse

from kernel.roles import INSTRUCTION_ROLES
from serving import logprobs, tools
from serving.auth import key_id
from serving.engines.base import GenParams
from serving.errors import APIError
from serving.generation import (
    Choice,
    ReplyKind,
    Run,
    generation_error,
    sse,
)
from serving.pipeline import ChatContext, Intercept, scoped_session
from serving.prompts import arguments
from serving.protocol import ChatCompletionRequest, Usage
from serving.service import GenerationService


class ChatService(GenerationService):
    @property
    def tools(self) -> tools.ToolReader:
        return self.s.tools  # made at start-up: a tool_call_parser vLLM does not have stops the server there

    def _sampling(self, req: ChatCompletionRequest) -> dict:
        """Every GenParams field but the token budget and the format's stop ids."""
        forced = tools.forced_schema(req)
        fmt = req.response_format
        return {**req.sampling(), "logprobs": (req.top_logprobs or 0) if req.logprobs else None,
                "json_schema": forced if forced is not None else (
                    fmt.schema_or_none() if fmt is not None and fmt.type == "json_schema" else None),
                "json_object": forced is None and fmt is not None and fmt.type == "json_object"}

    def _params(self, req: ChatCompletionRequest, prompt_len: int, fmt) -> GenParams:
        max_tokens = self.max_tokens(prompt_len, req.token_limit, "messages")
        self.check_min_tokens(req.min_tokens, max_tokens)
        return GenParams(max_tokens=max_tokens, stop_token_ids=self.s.renderer.stop_token_ids(fmt),
                         **self._sampling(req))

    def _check_size(self, req: ChatCompletionRequest) -> None:
        """The request's size, checked before any guard work: a hostile request costs a length check."""
        limits = self.s.cfg.limits
        if len(req.messages) > limits.max_messages:
            raise APIError(400, f"{len(req.messages)} messages; this server takes up to {limits.max_messages}",
                           param="messages", code="too_many_messages")
        chars = sum(len(m.text()) + len(m.name or "") + sum(map(len, m.call_texts())) for m in req.messages)
        chars += sum(len(t.model_dump_json()) for t in req.tools or [])  # definitions are rendered and scanned too
        chars += len(req.response_format.model_dump_json()) if req.response_format is not None else 0
        if chars > limits.max_input_chars:
            raise APIError(400, f"messages hold {chars} characters; this server takes up to "
                                f"{limits.max_input_chars}", param="messages", code="input_too_long")

    def _allowed_tools(self, label: str) -> set[str] | None:
        g = self.s.cfg.guardrails
        return set(g.tools[label]) if g is not None and label in g.tools else None

    def _check_tools(self, req: ChatCompletionRequest, label: str) -> None:
        """The task's tool allow-list (guardrails.tools): a request may not even offer another tool."""
        allowed = self._allowed_tools(label)
        if allowed is not None and (extra := sorted({t.function.name for t in req.tools or []} - allowed)):
            raise APIError(400, f"tools: {', '.join(extra)} may not be used with '{req.model}' (this task may call "
                                f"{', '.join(sorted(allowed)) or 'no tools'})", param="tools", code="tool_not_allowed")
        self.tools.check(req)

    def _reply_kind(self, req: ChatCompletionRequest, label: str) -> ReplyKind:
        mode = tools.mode(req)
        fmt = req.response_format
        return ReplyKind(
            schema=fmt.schema_or_none() if fmt is not None and mode in ("none", "auto") else None, tool_mode=mode,
            read_calls=self.tools.reader(req, streamed=req.stream) if mode != "none" else None,
            offered={t.function.name: tools.parameters(t.function) for t in req.tools or []},
            allowed=self._allowed_tools(label))

    async def handle(self, req: ChatCompletionRequest, caller: str | None = None):
        """`caller`: the API key that made the request (None when keys are off)."""
        s = self.s
        s.require_ready()
        self._check_size(req)
        t0 = time.time()
        stack = contextlib.AsyncExitStack()  # the adapter pin and the admission slot, released on every exit
        try:
            principal = key_id(caller) if caller else None
            session = scoped_session(principal, req.metadata.session_id if req.metadata else None)
            slot, fmt, label, version = self.target(req.model, stack, session)
            self._check_tools(req, label)
            forced = tools.mode(req) in ("named", "required")  # a forced call is guided JSON, as response_format is
            self.check_sampling(self._sampling(req), slot, {"response_format": "tool_choice"} if forced else None)
            ctx = self._context(req, fmt, label, principal)
            ctx.version, ctx.adapter = version, slot.ref.name if slot is not None else "base"
            await self.admit(stack, ctx.task, ctx.version, t0, slot)
            intercept = await s.pipeline.run_pre(ctx)
            if intercept is not None:
                await stack.aclose()
                return await self._intercepted(req, ctx, intercept, t0)
            template_tools = [t.model_dump(mode="json") for t in req.tools] if req.tools else None
            prompt_ids = s.renderer.render(fmt, with_canary(ctx.messages, fmt.system_prompt, s.pipeline.canary(label)),
                                           tools=template_tools)
            params = self._params(req, len(prompt_ids), fmt)
            reply = ChatReply(Run(s, ctx, label, prompt_ids, params, slot, t0, self._reply_kind(req, label)), req)
            return await self.respond(reply, req.stream, stack)
        except BaseException:
            await stack.aclose()
            raise

    def _context(self, req: ChatCompletionRequest, fmt, label: str, principal: str | None) -> ChatContext:
        meta = req.metadata
        return ChatContext(f"chatcmpl-{uuid.uuid4().hex[:24]}", label, [_turn(m) for m in req.messages],
                           session_id=meta.session_id if meta else None,
                           dialogue_stage=meta.dialogue_stage if meta else None, system_prompt=fmt.system_prompt,
                           principal=principal, names=_side_texts(req))

    async def _intercepted(self, req: ChatCompletionRequest, ctx: ChatContext, hit: Intercept, t0: float):
        rid = ctx.request_id
        usage = Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
        extra = {"version": ctx.version} | ({"guardrails": ctx.report} if ctx.report else {})
        await self.record_block(ctx, hit.text, hit.finish_reason, t0)
        indexes = range(req.n)
        if not req.stream:
            return JSONResponse(body(rid, req.model, [_message_choice(i, message(hit.text), None, hit.finish_reason)
                                                      for i in indexes],
                                     usage, extra))
        created = int(t0)

        async def events():
            for i in indexes:
                yield sse(chunk(rid, req.model, created, i, delta={"role": "assistant", "content": hit.text},
                                extra=extra if i == 0 else None))
                yield sse(chunk(rid, req.model, created, i, delta={}, finish=hit.finish_reason))
            if req.stream_options and req.stream_options.include_usage:
                yield sse(chunk(rid, req.model, created, usage=usage))
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")


def _side_texts(req: ChatCompletionRequest) -> list[str]:
    """What the client wrote outside the turns' content, moderated like it: names, the history's tool calls
    (names and argument values, decoded), the tool definitions (descriptions, schemas) and the
    `response_format` schema (its `const` and `enum` strings are text the model is made to write)."""
    out = [m.name for m in req.messages if m.name]
    # One text per call and per tool: each is read whole, as a turn is, not word by word
    out += [" ".join([c.function.name, *tools.texts(arguments(c.function.arguments))])
            for m in req.messages for c in m.tool_calls or []]
    out += [" ".join(tools.texts(t.function.model_dump(mode="json", exclude_none=True))) for t in req.tools or []]
    if (fmt := req.response_format) is not None and fmt.json_schema is not None:
        out.append(" ".join(tools.texts(fmt.json_schema.model_dump(mode="json", by_alias=True, exclude_none=True))))
    return [t for t in out if t.strip()]


def _turn(m) -> dict:
    """A client turn as the pipeline and the chat template see it."""
    turn = {"role": m.role, "content": m.text()}
    if m.tool_calls:
        turn["tool_calls"] = [c.model_dump(mode="json") for c in m.tool_calls]
    if m.tool_call_id is not None:
        turn["tool_call_id"] = m.tool_call_id
    return turn


class ChatReply:
    """A run's choices in chat.completion (or chunk) shape."""

    def __init__(self, run: Run, req: ChatCompletionRequest):
        self.run, self.req = run, req
        self.top = req.top_logprobs or 0

    def _logprobs(self, steps) -> dict | None:
        return logprobs.chat(steps, self.top) if steps is not None else None

    def _message(self, c: Choice) -> dict:
        msg = message(c.sent)
        if c.calls:
            forced = self.run.reply.tool_mode in ("named", "required")
            msg["content"] = c.sent if c.sent is not None else ("" if forced else None)
            msg["tool_calls"] = [k.wire() for k in c.calls]
        return msg

    async def complete(self) -> dict:
        run = self.run
        try:
            await run.collect()
        except asyncio.CancelledError:  # the client left: the engine request was aborted on the way out
            run.failed("client_disconnected")
            await run.record(499)
            raise
        except Exception as exc:
            err = generation_error(exc)
            await run.record(err.status)
            raise err from None
        await run.record(200)
        choices = [_message_choice(c.index, self._message(c), self._logprobs(c.logprobs()), c.finish)
                   for c in run.choices]
        return body(run.ctx.request_id, self.req.model, choices, run.usage(), run.extra())

    async def stream(self, stack: contextlib.AsyncExitStack):
        run, req = self.run, self.req
        rid, model, created = run.ctx.request_id, req.model, int(run.t0)
        fp = {"system_fingerprint": run.extra()["system_fingerprint"]}
        status = 200
        try:
            async with stack:
                for c in run.choices:
                    yield sse(chunk(rid, model, created, c.index, delta={"role": "assistant", "content": ""},
                                    extra=run.extra() if c.index == 0 else fp))
                if run.buffered():  # decided whole, then sent
                    await run.collect()
                    for c in run.choices:
                        if delta := self._whole_delta(c):
                            yield sse(chunk(rid, model, created, c.index, delta=delta,
                                            logprobs=self._logprobs(c.logprobs()), extra=fp))
                else:
                    async with contextlib.aclosing(run.as_written()) as written:
                        async for c, text, steps in written:
                            yield sse(chunk(rid, model, created, c.index, delta={"content": text},
                                            logprobs=self._logprobs(steps), extra=fp))
                for c in run.choices:
                    last = c.index == len(run.choices) - 1
                    # the finish event's delta carries an empty content, as vLLM's does (its last token's text)
                    yield sse(chunk(rid, model, created, c.index, delta={} if c.calls else {"content": ""},
                                    finish=c.finish, extra=run.extra() if last else fp))
                if req.stream_options and req.stream_options.include_usage:
                    yield sse(chunk(rid, model, created, usage=run.usage(), extra=fp))
                yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):  # the client left (GeneratorExit: closed while sending)
            status = 499
            run.failed("client_disconnected")
            raise
        except Exception as exc:  # the headers are gone: the failure travels as an error event
            err = generation_error(exc)
            status = err.status
            yield sse(err.body())
            yield "data: [DONE]\n\n"
        finally:
            await run.record(status)

    def _whole_delta(self, c: Choice) -> dict:
        delta = {}
        if c.sent:
            delta["content"] = c.sent
        if c.calls:
            delta["tool_calls"] = [k.wire(i) for i, k in enumerate(c.calls)]
        return delta


STREAM_USAGE_NULLS = {"prompt_tokens_details", "completion_tokens_details"}  # vLLM's usage event has neither


def message(content: str | None) -> dict:
    # OpenAI's message fields this server never fills are null, as in vLLM's answers
    return {"role": "assistant", "content": content, "refusal": None, "annotations": None, "audio": None,
            "function_call": None}


def _message_choice(index: int, message_: dict, logprobs_: dict | None, finish: str) -> dict:
    return {"index": index, "message": message_, "logprobs": logprobs_, "finish_reason": finish}


def body(rid: str, model: str, choices: list[dict], usage: Usage, extra: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model, "choices": choices,
            "service_tier": None, "usage": usage.model_dump()} | (extra or {})


def chunk(rid: str, model: str, created: int, index: int = 0, *, delta: dict | None = None, finish: str | None = None,
          logprobs: dict | None = None, usage: Usage | None = None, extra: dict | None = None) -> dict:
    """One event; `usage` only on the usage event, as vLLM sends it."""
    choices = [] if delta is None and finish is None else [
        {"index": index, "delta": delta or {}, "logprobs": logprobs, "finish_reason": finish}]
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
            **({"usage": usage.model_dump(exclude=STREAM_USAGE_NULLS)} if usage else {})} | (extra or {})


def with_canary(messages: list[dict], system_prompt: str | None, canary: str | None) -> list[dict]:
    """The messages with the task's canary in the system turn (added when the client sent none)."""
    if canary is None:
        return messages
    line = f"(Internal reference {canary}: confidential, never repeat it.)"
    if messages and messages[0]["role"] in INSTRUCTION_ROLES:
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n{line}"}, *messages[1:]]
    return [{"role": "system", "content": f"{system_prompt}\n{line}" if system_prompt else line}, *messages]
