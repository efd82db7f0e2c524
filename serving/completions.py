"""POST /v1/completions: a raw prompt continued, through the same guard as chat.

Each prompt is moderated as a user turn (retrieval and the task's system prompt belong to chat and do
not apply), generated with its `n` choices, and each choice goes through the output filter and
compliance like a chat reply. A list of prompts runs them together under one admission slot; choice
`i * n + j` is prompt i's choice j, as in OpenAI's API.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import anyio

from serving import logprobs
from serving.auth import key_id
from serving.engines.base import GenParams
from serving.errors import APIError
from serving.generation import ReplyKind, Run, generation_error, sse
from serving.pipeline import ChatContext
from serving.protocol import CompletionRequest, Usage
from serving.service import GenerationService

MAX_SEQUENCES = 16  # prompts x n per request


class CompletionService(GenerationService):
    def _sampling(self, req: CompletionRequest) -> dict:
        return {**req.sampling(), "logprobs": req.logprobs}

    async def handle(self, req: CompletionRequest, caller: str | None = None):
        s = self.s
        s.require_ready()
        prompts = req.prompts()
        if len(prompts) * req.n > MAX_SEQUENCES:  # they all run under one admission slot
            raise APIError(400, f"{len(prompts)} prompts x n={req.n} is {len(prompts) * req.n} generations; this server "
                                f"takes up to {MAX_SEQUENCES} per request", param="n", code="too_many_choices")
        if (chars := sum(map(len, prompts))) > s.cfg.limits.max_input_chars:
            raise APIError(400, f"prompt holds {chars} characters; this server takes up to "
                                f"{s.cfg.limits.max_input_chars}", param="prompt", code="input_too_long")
        t0 = time.time()
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        stack = contextlib.AsyncExitStack()
        try:
            principal = key_id(caller) if caller else None
            slot, fmt, label, version = self.target(req.model, stack, None)
            self.check_sampling(self._sampling(req), slot)
            await self.admit(stack, label, version, t0, slot)
            parts = [await self._part(req, f"{rid}-{i}" if len(prompts) > 1 else rid, p, slot, fmt, label, version,
                                      principal, t0) for i, p in enumerate(prompts)]
            reply = CompletionReply(rid, req, parts, t0)
            return await self.respond(reply, req.stream, stack)
        except BaseException:
            await stack.aclose()
            raise

    async def _part(self, req: CompletionRequest, rid: str, prompt: str, slot, fmt, label: str, version: str,
                    principal: str | None, t0: float) -> Part:
        """One prompt: moderated, then made ready to generate (or the refusal that stands for it). The task's
        system prompt is not in the prompt, but a reply repeating it is still a leak (protected)."""
        s = self.s
        ctx = ChatContext(rid, label, [{"role": "user", "content": prompt}], principal=principal, kind="completion",
                          system_prompt=fmt.system_prompt)
        ctx.version, ctx.adapter = version, slot.ref.name if slot is not None else "base"
        intercept = await s.pipeline.run_pre(ctx)
        if intercept is not None:
            await self.record_block(ctx, intercept.text, intercept.finish_reason, t0)
            return Part(prompt, None, intercept.text, intercept.finish_reason, ctx)
        # Moderation may have redacted the prompt: the engine gets what the guard passed.
        ids = s.renderer.tokenizer(ctx.messages[0]["content"])["input_ids"]
        max_tokens = self.max_tokens(len(ids), req.max_tokens, "prompt")
        self.check_min_tokens(req.min_tokens, max_tokens)
        params = GenParams(max_tokens=max_tokens, **self._sampling(req))
        return Part(prompt, Run(s, ctx, label, ids, params, slot, t0, ReplyKind()), None, None, ctx)


class Part:
    """One prompt of a request: its run, or the refusal the guard gave instead."""

    def __init__(self, prompt: str, run: Run | None, refusal: str | None, finish: str | None, ctx: ChatContext):
        self.prompt, self.run, self.refusal, self.finish, self.ctx = prompt, run, refusal, finish, ctx


class CompletionReply:
    """The parts' choices in text_completion shape."""

    def __init__(self, rid: str, req: CompletionRequest, parts: list[Part], t0: float):
        self.rid, self.req, self.parts, self.t0 = rid, req, parts, t0

    def _choices(self, part: Part, at: int) -> list[dict]:
        n, req = self.req.n, self.req
        if part.run is None:
            return [_choice(at * n + j, part.refusal, None, part.finish) for j in range(n)]
        echo = part.prompt if req.echo else ""
        return [_choice(at * n + c.index, echo + (c.sent or ""),
                        logprobs.completion(c.logprobs(), req.logprobs, len(echo)) if c.logprobs() is not None
                        else None, c.finish) for c in part.run.choices]

    def usage(self) -> Usage:
        runs = [p.run for p in self.parts if p.run is not None]
        prompt = sum(len(r.prompt_ids) for r in runs)
        out = sum(r.usage().completion_tokens for r in runs)
        return Usage(prompt_tokens=prompt, completion_tokens=out, total_tokens=prompt + out)

    def extra(self) -> dict:
        runs = [p.run for p in self.parts if p.run is not None]
        first = self.parts[0]
        extra = runs[0].extra() if runs else {"version": first.ctx.version}
        reports = [p.ctx.report for p in self.parts]
        if len(self.parts) > 1:
            extra.pop("guardrails", None)
            if any(reports):
                extra["guardrails"] = {"prompts": reports}
        elif first.run is None and first.ctx.report:
            extra["guardrails"] = first.ctx.report
        return extra

    async def _run_all(self) -> None:
        """Every prompt's run together; each leaves its record however the request ends."""
        runs = [p.run for p in self.parts if p.run is not None]
        try:
            await asyncio.gather(*(r.collect() for r in runs))
        except asyncio.CancelledError:  # the client left: gather cancelled every run (their engine requests abort)
            for r in runs:
                r.failed("client_disconnected")
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*(r.record(499) for r in runs))
            raise
        except Exception as exc:
            err = generation_error(exc)
            await asyncio.gather(*(r.record(err.status) for r in runs))
            raise err from None
        await asyncio.gather(*(r.record(200) for r in runs))

    async def complete(self) -> dict:
        await self._run_all()
        choices = [c for i, p in enumerate(self.parts) for c in self._choices(p, i)]
        return {"id": self.rid, "object": "text_completion", "created": int(time.time()), "model": self.req.model,
                "choices": choices, "usage": self.usage().model_dump()} | self.extra()

    async def stream(self, stack: contextlib.AsyncExitStack):
        """One prompt that needs no whole-reply decision streams as written; otherwise each choice goes out
        whole once every prompt is done (the guard decides whole replies). Then usage."""
        created, model = int(self.t0), self.req.model
        run = self.parts[0].run if len(self.parts) == 1 else None
        try:
            async with stack:
                if run is not None and not run.buffered() and not self.req.echo:
                    async for chunk in self._live(run, created):
                        yield chunk
                else:
                    await self._run_all()
                    choices = [c for i, p in enumerate(self.parts) for c in self._choices(p, i)]
                    for k, c in enumerate(choices):  # the guard's report once, with the last choice
                        yield sse(_chunk(self.rid, model, created, [c], self.extra() if k == len(choices) - 1
                                         else {"system_fingerprint": self.extra().get("system_fingerprint")}))
                if self.req.stream_options and self.req.stream_options.include_usage:
                    yield sse(_chunk(self.rid, model, created, [], self.extra(), self.usage()))
                yield "data: [DONE]\n\n"
        except APIError as err:  # the headers are gone: the failure travels as an error event
            yield sse(err.body())
            yield "data: [DONE]\n\n"

    async def _live(self, run: Run, created: int):
        offsets = [0] * len(run.choices)
        status = 200
        try:
            async with contextlib.aclosing(run.as_written()) as written:
                async for c, text, steps in written:
                    lp = None
                    if steps is not None and self.req.logprobs is not None:
                        lp = logprobs.completion(steps, self.req.logprobs, offsets[c.index])
                        offsets[c.index] += sum(len(s.token) for s in steps)
                    yield sse(_chunk(self.rid, self.req.model, created, [_choice(c.index, text, lp, None)],
                                     {"system_fingerprint": run.ctx.adapter}))
            for c in run.choices:
                yield sse(_chunk(self.rid, self.req.model, created, [_choice(c.index, "", None, c.finish)],
                                 self.extra()))
        except (asyncio.CancelledError, GeneratorExit):
            status = 499
            run.failed("client_disconnected")
            raise
        except Exception as exc:
            err = generation_error(exc)
            status = err.status
            raise err from None
        finally:
            await run.record(status)


def _choice(index: int, text: str, logprobs_: dict | None, finish: str) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs_, "finish_reason": finish}


def _chunk(rid: str, model: str, created: int, choices: list[dict], extra: dict, usage: Usage | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            **({"usage": usage.model_dump()} if usage else {})} | extra
