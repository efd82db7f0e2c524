"""What chat and text completions share before the engine call: the target (base or a task's pinned
adapter), the caller's rate limit, admission, and the generation parameters with their limits."""

from __future__ import annotations

import asyncio
import contextlib
import time

from fastapi.responses import JSONResponse

from guardrails import outcomes
from serving.engines.base import GenParams
from serving.errors import APIError
from serving.generation import HeldStream, audit_record
from serving.metrics import RequestRecord
from serving.registry import STABLE, TaskNotFound
from serving.stages import BASE

GREEDY = 1e-5  # vLLM's _SAMPLING_EPS: a temperature under it is greedy


class GenerationService:
    def __init__(self, state):
        self.s = state  # serving.state.ServerState

    @staticmethod
    async def respond(reply, stream: bool, stack: contextlib.AsyncExitStack):
        """Stream the reply (`stack` closes when the stream ends) or answer whole (it closes here)."""
        if stream:
            return HeldStream(reply.stream(stack), stack)
        async with stack:
            return JSONResponse(await reply.complete())

    def target(self, model: str, stack: contextlib.AsyncExitStack, session: str | None):
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

    def check_rate(self, model: str, who: str) -> None:
        """The caller's rate limit; a refusal is recorded under the model it named, as a bounded label."""
        s = self.s
        try:
            s.limiter.check(who)
        except APIError as exc:
            known = s.registry is not None and model in s.registry.tasks
            label = model if known else BASE if model in (s.cfg.base_model, BASE) else "unknown"
            s.metrics.observe(RequestRecord(time.time(), label, exc.status, exc.code, 0, 0, 0.0, None))
            raise

    async def admit(self, stack: contextlib.AsyncExitStack, task: str, version: str, t0: float, slot) -> None:
        """Wait for a generation slot. Guard work counts against admission too, so a flood of guarded
        requests queues like any other. Refused (429) and abandoned (499, client gone) waits are recorded.
        A task served by the transformers engine beside vLLM waits in that engine's own queue."""
        side = slot is not None and slot.ref.engine == "transformers" and self.s.side_admission is not None
        try:
            await stack.enter_async_context((self.s.side_admission if side else self.s.admission).slot())
        except (APIError, asyncio.CancelledError) as exc:
            status, code = ((exc.status, exc.code or "rejected") if isinstance(exc, APIError)
                            else (499, "client_disconnected"))
            self.s.metrics.observe(RequestRecord(time.time(), task, status, code, 0, 0, time.time() - t0, None,
                                                 version=version))
            raise

    def max_tokens(self, prompt_len: int, requested: int | None, prompt_param: str) -> int:
        """The request's token budget, within the context window and the server's cap."""
        ctx_len, cap = self.s.cfg.max_model_len, self.s.cfg.limits.max_tokens_cap
        if prompt_len >= ctx_len:
            raise APIError(400, f"prompt is {prompt_len} tokens; the context window is {ctx_len}",
                           param=prompt_param, code="context_length_exceeded")
        if requested is not None and requested > cap:
            raise APIError(400, f"max_tokens {requested} exceeds this server's cap of {cap}", param="max_tokens",
                           code="max_tokens_too_large")
        max_tokens = requested or min(cap, ctx_len - prompt_len)
        if prompt_len + max_tokens > ctx_len:
            raise APIError(400, f"prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the context "
                                f"window of {ctx_len}", param="max_tokens", code="context_length_exceeded")
        return max_tokens

    def check_sampling(self, fields: dict, slot, renamed: dict[str, str] | None = None) -> None:
        """vLLM's SamplingParams rules that need the request as a whole, and what the engine cannot do
        (`renamed`: the request field behind a GenParams one, when it is not the same name)."""
        if fields["n"] > 1 and fields["temperature"] < GREEDY:
            raise APIError(400, f"n must be 1 when using greedy sampling, got {fields['n']}", param="n",
                           code="invalid_value")
        vocab = len(self.s.renderer.tokenizer)
        if bad := [t for t in fields["logit_bias"] if t >= vocab]:
            raise APIError(400, f"logit_bias: token id(s) {bad[:5]} are outside the vocabulary of {vocab}",
                           param="logit_bias", code="invalid_value")
        probe = GenParams(max_tokens=1, **fields)
        if missing := self.s.engine.unsupported(probe, slot.ref if slot is not None else None):
            missing = [(renamed or {}).get(m, m) for m in missing]
            raise APIError(400, f"the transformers engine serving this model does not support {', '.join(missing)}; "
                                f"a task served by vLLM does", param=missing[0], code="unsupported_parameter")

    def check_min_tokens(self, min_tokens: int, max_tokens: int) -> None:
        if min_tokens > max_tokens:  # as vLLM's SamplingParams rejects it
            raise APIError(400, f"min_tokens ({min_tokens}) must be at most max_tokens ({max_tokens})",
                           param="min_tokens", code="invalid_value")

    async def record_block(self, ctx, text: str, finish: str, t0: float) -> None:
        """A request (or one prompt of it) the input guard refused: its metrics and its audit record."""
        inp = ctx.report.get("input", {})
        self.s.metrics.observe(RequestRecord(time.time(), ctx.task, 200, finish, 0, 0, time.time() - t0, None,
                                             guardrail=outcomes.BLOCKED, blocked_by=inp.get("blocked_by"),
                                             guard_ms=inp.get("latency_ms"), version=ctx.version))
        await audit_record(self.s.pipeline, ctx, outcome=outcomes.BLOCKED, raw=None, sent=text, t0=t0)
