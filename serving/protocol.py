"""OpenAI chat-completions wire types: what the official client sends and expects back."""

from __future__ import annotations

import math
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class RequestMetadata(BaseModel):
    """guardtune's use of OpenAI's free-form `metadata`: who is talking and at which dialogue stage."""
    model_config = ConfigDict(extra="allow")
    session_id: str | None = Field(None, max_length=128)
    dialogue_stage: str | None = Field(None, max_length=64)


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=128)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    metadata: RequestMetadata | None = None
    user: str | None = Field(None, max_length=256)

    @field_validator("temperature", "top_p")
    @classmethod
    def _finite(cls, v):
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("up to 4 non-empty stop strings")
        return stops

    @model_validator(mode="after")
    def _turns(self):
        if self.messages[-1].role == "assistant":
            raise ValueError("the last message must not be an assistant turn")
        if not any(m.role == "user" for m in self.messages):
            raise ValueError("messages need at least one user turn")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def completion_body(rid: str, model: str, text: str, finish: str, usage: Usage, extra: dict | None = None) -> dict:
    body = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": usage.model_dump()}
    return body | (extra or {})


def chunk_body(rid: str, model: str, created: int, *, delta: dict | None = None, finish: str | None = None,
               usage: Usage | None = None, extra: dict | None = None) -> dict:
    choices = [] if delta is None and finish is None else [
        {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}]
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
            "usage": usage.model_dump() if usage else None}
    return body | (extra or {})
