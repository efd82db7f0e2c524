"""The request pipeline around the engine call: pre-model stages, the engine, post-model stages.

Guardrails and RAG plug in here as stages; serving itself knows no policy.
- A pre-stage sees the request context before the model. It may rewrite the messages (redaction,
  retrieved context) or intercept the request with a reply of its own (a refusal).
- A post-stage sees the full generated text and returns the text to send. When a post-stage
  buffers for the task (enforce), streamed replies are buffered, decided, then streamed;
  otherwise (monitor) the raw reply streams and the stage only records its decision. A reply that is
  data (JSON, tool calls) is not replaced; a post-stage only screens it (`screen`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol

from kernel.roles import INSTRUCTION_ROLES


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
    principal: str | None = None  # the caller's key id: sessions are scoped by it
    # What the client wrote beside the turns' content (names, tool calls, tool definitions): moderated like it
    names: list[str] = field(default_factory=list)
    # What a reply must not repeat: the manifest's system prompt and the client's system turns, taken
    # before retrieval adds its sources (quoting those is what a cited answer does).
    protected: list[str] = field(default_factory=list)
    version: str = "stable"  # which of the task's adapters serves it: "stable", or "canary" (serving/registry.py)
    adapter: str = "base"  # the adapter load that serves it (task@id), as system_fingerprint names it
    kind: str = "chat"  # or "completion": a raw prompt, no turns for retrieval to add sources to

    def __post_init__(self):
        if not self.protected:
            self.protected = ([self.system_prompt] if self.system_prompt else []) + [
                m["content"] for m in self.messages if m["role"] in INSTRUCTION_ROLES]

    @property
    def scoped_session(self) -> str | None:
        return scoped_session(self.principal, self.session_id)


def scoped_session(principal: str | None, session_id: str | None) -> str | None:
    """The session as stored (and as a canary split sees it): one key's "s-1" is never another key's."""
    if session_id is None:
        return None
    return hashlib.sha256(f"{principal or ''}\0{session_id}".encode()).hexdigest()[:32]


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
    async def screen(self, ctx: ChatContext, text: str) -> str: ...  # why a data reply is stopped, or ""


class AuditSink(Protocol):
    def applies(self, task: str) -> bool: ...
    async def write(self, record: dict) -> None: ...


class OutputGuard(Protocol):
    def filter_for(self, ctx: ChatContext): ...  # a guardrails.output.OutputFilter, or None when unguarded
    def canary(self, task: str) -> str | None: ...
    def leak_reply(self) -> str: ...


@dataclass
class Pipeline:
    pre: list[PreStage] = field(default_factory=list)
    post: list[PostStage] = field(default_factory=list)
    audit: AuditSink | None = None
    output: OutputGuard | None = None

    def canary(self, task: str) -> str | None:
        return self.output.canary(task) if self.output is not None else None

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

    async def screen(self, ctx: ChatContext, text: str) -> str:
        """The first post-stage's reason to stop a data reply (JSON, tool calls), or ""."""
        for stage in self.post:
            if reason := await stage.screen(ctx, text):
                return reason
        return ""
