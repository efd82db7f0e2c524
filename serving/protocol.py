"""Wire types: OpenAI's chat completions and moderations as the official client sends and reads them, the
admin API's request body, and the one error body every route answers with."""

from __future__ import annotations

import math
import time
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator


def _unicode(v: str) -> str:
    # JSON can carry a lone surrogate ("\ud800"): it cannot be encoded, tokenized or echoed back, so it is a 400.
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (not a lone surrogate escape)") from None
    return v


Text = Annotated[str, AfterValidator(_unicode)]
MODERATION_MAX_INPUTS = 32


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, strict=True)


class RequestMetadata(BaseModel):
    """guardtune's use of OpenAI's free-form `metadata`: who is talking and at which dialogue stage."""
    model_config = ConfigDict(extra="allow", json_schema_extra={
        "additionalProperties": {"type": "string", "maxLength": 512}, "propertyNames": {"maxLength": 64},
        "maxProperties": 16})
    session_id: Text | None = Field(None, max_length=128)
    dialogue_stage: Text | None = Field(None, max_length=64)

    @model_validator(mode="after")
    def _openai_limits(self):
        # OpenAI's rule: up to 16 pairs of short strings. It also keeps arbitrary nested JSON out of requests.
        extra = self.model_extra or {}
        too_many = len(self.model_fields_set) > 16  # the extras count among the fields set
        if too_many or any(len(k) > 64 or not isinstance(v, str) or len(v) > 512
                           or v.encode("utf-8", "replace").decode("utf-8") != v for k, v in extra.items()):
            raise ValueError("metadata is up to 16 string values (keys up to 64, values up to 512 characters)")
        return self


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "base", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}]})
    model: Text = Field(min_length=1, max_length=128)
    messages: list[ChatMessage] = Field(min_length=1)
    # strict: "8", 8.0 or "yes" are not what the schema says, so they are 400s, not quietly coerced
    max_tokens: int | None = Field(None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)
    temperature: float | None = Field(None, ge=0.0, le=2.0, strict=True)
    # Below 1e-3 (Schemathesis sent 5e-324) the float32 sampler fails: a 500, so the floor is a 400.
    top_p: float | None = Field(None, ge=1e-3, le=1.0, strict=True)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1, strict=True)
    n: int = Field(1, ge=1, le=1, strict=True)
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    metadata: RequestMetadata | None = None
    user: Text | None = Field(None, max_length=256)
    # vLLM's sampling extensions, as its OpenAI server defines and checks them (SamplingParams._verify_args);
    # min_tokens <= max_tokens is checked once max_tokens is known (serving/chat.py).
    # top_k -1 or 0: off. Past 64 bits it fails in vLLM's engine core (a 500): int64, as for seed, is the ceiling.
    top_k: int | None = Field(None, ge=-1, le=2**63 - 1, strict=True)
    min_p: float | None = Field(None, ge=0.0, le=1.0, strict=True)
    repetition_penalty: float | None = Field(None, gt=0.0, strict=True)
    min_tokens: int = Field(0, ge=0, strict=True)
    ignore_eos: bool = Field(False, strict=True)
    skip_special_tokens: bool = Field(True, strict=True)

    @field_validator("temperature", "top_p", "min_p", "repetition_penalty")
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

    def vllm_sampling(self) -> dict:
        """The vLLM extensions as GenParams fields, unset ones at vLLM's defaults (top_k -1 is vLLM's other "off")."""
        return {"top_k": max(self.top_k or 0, 0), "min_p": self.min_p or 0.0,
                "repetition_penalty": 1.0 if self.repetition_penalty is None else self.repetition_penalty,
                "min_tokens": self.min_tokens, "ignore_eos": self.ignore_eos,
                "skip_special_tokens": self.skip_special_tokens}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    """What completion_body() builds; declared in the OpenAPI schema so clients and fuzzers can check it."""
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class ModerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # The schema states what the handler enforces: one non-empty string, or 1 to 32 of them.
    input: Annotated[Text, Field(min_length=1)] | Annotated[list[Annotated[Text, Field(min_length=1)]],
                                                            Field(min_length=1, max_length=MODERATION_MAX_INPUTS)]
    model: Text | None = None


class TaskPut(BaseModel):  # PUT /admin/tasks/{task}: the adapter directory to serve the task with
    model_config = ConfigDict(extra="forbid")
    adapter: str = Field(min_length=1, max_length=4096)


class CanaryPut(BaseModel):  # PUT /admin/tasks/{task}/canary: a second adapter for a share of the task's sessions
    model_config = ConfigDict(extra="forbid")
    adapter: str = Field(min_length=1, max_length=4096)
    share: float = Field(ge=0.0, le=1.0, strict=True, allow_inf_nan=False)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """The body of every 4xx/5xx answer, as documented in the OpenAPI schema."""
    error: ErrorDetail


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
