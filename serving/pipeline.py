"""The request pipeline around the engine call: pre-model stages, the engine, post-model stages.

Guardrails and RAG plug in here (issue #4) as stages; serving itself knows no policy.
- A pre-stage sees the request context before the model. It may rewrite the messages (redaction,
  retrieved context) or intercept the request with a reply of its own (a refusal).
- A post-stage sees the full generated text and returns the text to send. When a post-stage
  buffers for the task (enforce), streamed replies are buffered, decided, then streamed;
  otherwise (monitor) the raw reply streams and the stage only records its decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class ChatContext:
    request_id: str
    task: str  # the task name, or the base model id
    messages: list[dict]  # role/content dicts; stages may rewrite them
    session_id: str | None = None
    dialogue_stage: str | None = None
    report: dict = field(default_factory=dict)  # returned to the client as `guardrails`
    system_prompt: str | None = None  # the task's manifest prompt, for stages that add a system turn
    citations: list[dict] = field(default_factory=list)  # returned to the client as `citations`


@dataclass
class Intercept:
    text: str
    finish_reason: str = "content_filter"


class PreStage(Protocol):
    name: str

    async def before(self, ctx: ChatContext) -> Intercept | None: ...


class PostStage(Protocol):
    name: str

    def buffers(self, task: str) -> bool: ...  # True: the client sees only what after() returns
    async def after(self, ctx: ChatContext, text: str) -> str: ...


class AuditSink(Protocol):
    def applies(self, task: str) -> bool: ...
    def write(self, record: dict) -> None: ...


@dataclass
class Pipeline:
    pre: list[PreStage] = field(default_factory=list)
    post: list[PostStage] = field(default_factory=list)
    audit: AuditSink | None = None

    def audits(self, task: str) -> bool:
        return self.audit is not None and self.audit.applies(task)

    async def run_pre(self, ctx: ChatContext) -> Intercept | None:
        for stage in self.pre:
            if (hit := await stage.before(ctx)) is not None:
                return hit
        return None

    def buffers(self, task: str) -> bool:
        return any(stage.buffers(task) for stage in self.post)

    async def run_post(self, ctx: ChatContext, text: str) -> str:
        for stage in self.post:
            text = await stage.after(ctx, text)
        return text
