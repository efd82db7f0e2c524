"""Wire types: OpenAI's chat completions and moderations as the official client sends and reads them, the
admin API's request body, and the one error body every route answers with."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from guardrails import structured


def _unicode(v: str) -> str:
    # JSON can carry a lone surrogate ("\ud800"): it cannot be encoded, tokenized or echoed back, so it is a 400.
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (not a lone surrogate escape)") from None
    return v


Text = Annotated[str, AfterValidator(_unicode)]
MODERATION_MAX_INPUTS = 32
MAX_CHOICES = 8  # n: each choice is a generation and a compliance decision
MAX_TOP_LOGPROBS = 20  # vLLM's default max_logprobs
TOKEN_ID = re.compile(r"[0-9]{1,9}")  # ASCII digits: str.isdigit() takes '²', which int() refuses


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Text = Field(min_length=1, max_length=64)
    arguments: Text  # JSON text, as the model wrote it


class ToolCall(BaseModel):  # an assistant turn's call, as the client sends the history back
    model_config = ConfigDict(extra="forbid")
    id: Text = Field(max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=64)  # assistant turns
    tool_call_id: Text | None = Field(None, max_length=128)  # tool turns: the call this is the result of

    @model_validator(mode="after")
    def _shape(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} turn needs content (only an assistant turn with tool_calls may omit it)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant turns carry tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool turns, and only they, carry tool_call_id")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def call_texts(self) -> list[str]:
        """What the turn's tool calls say: names and arguments, moderated like content."""
        return [t for c in self.tool_calls or [] for t in (c.function.name, c.function.arguments)]


def _checked_schema(schema: dict) -> dict:
    structured.check_schema(schema)
    return schema


# A client's JSON schema: the server decodes to it and checks replies against it (guardrails/structured.py)
JSONSchema = Annotated[dict[str, Any], AfterValidator(_checked_schema)]


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Text = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: Text | None = None
    parameters: JSONSchema | None = None  # none: any object
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Text


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: Text = Field(min_length=1, max_length=64)
    description: Text | None = None
    # `schema` is a BaseModel attribute: the field is held as json_schema and read and written as "schema"
    json_schema: JSONSchema | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with type json_schema, and only then")
        return self

    def schema_or_none(self) -> dict | None:
        """The JSON schema a reply must meet: the given one, any object for json_object, none for text."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema":
            return self.json_schema.json_schema or {}
        return None


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


class Sampling(BaseModel):
    """The fields chat and text completions share: budget, sampling, penalties, stops, choices, streaming."""
    model_config = ConfigDict(extra="forbid")
    model: Text = Field(min_length=1, max_length=128)
    # strict: "8", 8.0 or "yes" are not what the schema says, so they are 400s, not quietly coerced
    max_tokens: int | None = Field(None, ge=1, strict=True)
    temperature: float | None = Field(None, ge=0.0, le=2.0, strict=True)
    # Below 1e-3 (Schemathesis sent 5e-324) the float32 sampler fails: a 500, so the floor is a 400.
    top_p: float | None = Field(None, ge=1e-3, le=1.0, strict=True)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1, strict=True)
    n: int = Field(1, ge=1, le=MAX_CHOICES, strict=True)
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    user: Text | None = Field(None, max_length=256)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, strict=True)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, strict=True)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, strict=True)]] | None = Field(None, max_length=1024)
    # vLLM's sampling extensions, as its OpenAI server defines and checks them (SamplingParams._verify_args);
    # min_tokens <= max_tokens is checked once max_tokens is known (serving/service.py).
    # top_k -1 or 0: off. Past 64 bits it fails in vLLM's engine core (a 500): int64, as for seed, is the ceiling.
    top_k: int | None = Field(None, ge=-1, le=2**63 - 1, strict=True)
    min_p: float | None = Field(None, ge=0.0, le=1.0, strict=True)
    repetition_penalty: float | None = Field(None, gt=0.0, strict=True)
    min_tokens: int = Field(0, ge=0, strict=True)
    ignore_eos: bool = Field(False, strict=True)
    skip_special_tokens: bool = Field(True, strict=True)

    @field_validator("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
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

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v):
        if v and any(not TOKEN_ID.fullmatch(k) for k in v):
            raise ValueError("keys are token ids (non-negative integers as strings)")
        return v

    def sampling(self) -> dict:
        """These fields as GenParams fields, unset ones at vLLM's defaults (top_k -1 is vLLM's other "off")."""
        return {"temperature": 1.0 if self.temperature is None else self.temperature,
                "top_p": 1.0 if self.top_p is None else self.top_p, "seed": self.seed, "stop": list(self.stop or []),
                "top_k": max(self.top_k or 0, 0), "min_p": self.min_p or 0.0,
                "repetition_penalty": 1.0 if self.repetition_penalty is None else self.repetition_penalty,
                "min_tokens": self.min_tokens, "ignore_eos": self.ignore_eos,
                "skip_special_tokens": self.skip_special_tokens, "n": self.n,
                "presence_penalty": self.presence_penalty or 0.0, "frequency_penalty": self.frequency_penalty or 0.0,
                "logit_bias": {int(k): v for k, v in (self.logit_bias or {}).items()}}


class ChatCompletionRequest(Sampling):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "base", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}]})
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)
    metadata: RequestMetadata | None = None
    logprobs: bool = Field(False, strict=True)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, strict=True)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = Field(None, strict=True)

    @model_validator(mode="after")
    def _turns(self):
        if self.messages[-1].role == "assistant":
            raise ValueError("the last message must not be an assistant turn")
        if not any(m.role == "user" for m in self.messages):
            raise ValueError("messages need at least one user turn")
        return self

    @model_validator(mode="after")
    def _logprobs(self):
        if self.top_logprobs and not self.logprobs:  # vLLM's and OpenAI's rule
            raise ValueError("when using `top_logprobs`, `logprobs` must be set to true")
        return self

    @model_validator(mode="after")
    def _tools(self):
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: each function name once")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names '{choice.function.name}', which is not in tools")
        if choice in ("auto", "required") and not names:
            raise ValueError(f'tool_choice "{choice}" needs tools')
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


COMPLETION_MAX_PROMPTS = 16  # prompts per /v1/completions request: each is its own generation and guard pass


class CompletionRequest(Sampling):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "base", "prompt": "The capital of France is", "max_tokens": 8}]})
    # Text only: the guard reads what it moderates, so token-id prompts are not taken.
    prompt: Annotated[Text, Field(min_length=1)] | Annotated[
        list[Annotated[Text, Field(min_length=1)]], Field(min_length=1, max_length=COMPLETION_MAX_PROMPTS)]
    max_tokens: int | None = Field(16, ge=1, strict=True)  # OpenAI's and vLLM's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, strict=True)
    echo: bool = Field(False, strict=True)
    suffix: None = Field(None, description="not supported (nor by vLLM's server)")

    @model_validator(mode="after")
    def _supported(self):
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported: prompt logprobs are not computed")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: None = None  # null, as vLLM's server sends them
    completion_tokens_details: None = None


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None  # None: a tool call alone, or a data reply the guard withheld
    tool_calls: list[ToolCallOut] | None = None
    refusal: None = None  # OpenAI's fields this server never fills, null as in vLLM's answers
    annotations: None = None
    audio: None = None
    function_call: None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None  # None also where the guard changed the text: they would describe another
    finish_reason: str


class ChatCompletion(BaseModel):
    """What serving/chat.py's body() builds; declared in the OpenAPI schema so clients and fuzzers can check it."""
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict | None  # text_offset, token_logprobs, tokens, top_logprobs; None where the guard changed the text
    finish_reason: str


class TextCompletion(BaseModel):
    """What serving/completions.py builds."""
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
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


# --- /v1/embeddings (serving/embeddings.py) --------------------------------------------------------------
# Kept apart from the chat types above. vLLM's own EmbeddingRequest is not reused: it takes any extra
# field (extra="allow"), coerces "8" to 8, and adds chat-message inputs and its own extensions.

EMBEDDING_MAX_INPUTS = 2048  # OpenAI's limit on inputs per request

TokenId = Annotated[int, Field(strict=True, ge=0)]
_TOKENS_SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
# The schema states the rules the validator below enforces (the validator, not union branches, says
# what is wrong: "input cannot be an empty string", as OpenAI words it).
_EMBEDDING_INPUT_SCHEMA = {
    "title": "Input", "description": "a text, texts, the token ids of one text, or token ids of texts",
    "anyOf": [{"type": "string", "minLength": 1},
              {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
               "maxItems": EMBEDDING_MAX_INPUTS},
              _TOKENS_SCHEMA,
              {"type": "array", "items": _TOKENS_SCHEMA, "minItems": 1, "maxItems": EMBEDDING_MAX_INPUTS}]}


def _embedding_request_schema(schema: dict) -> None:
    schema["properties"]["input"] = _EMBEDDING_INPUT_SCHEMA
    schema["examples"] = [{"model": "all-minilm-l6-v2",
                           "input": ["Do you install batteries?", "Solar panels in winter"]}]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_embedding_request_schema)
    model: Text = Field(min_length=1, max_length=128)
    input: Text | list[Text] | list[TokenId] | list[list[TokenId]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, strict=True)
    user: Text | None = Field(None, max_length=256)

    @field_validator("input", mode="wrap")
    @classmethod
    def _inputs(cls, v, handler):
        try:
            v = handler(v)
        except ValueError as exc:  # pydantic's ValidationError: one error per union branch, none of them the point
            if any(e["type"] == "value_error" for e in exc.errors()):
                raise ValueError("input must be valid Unicode (not a lone surrogate escape)") from None
            raise ValueError("input must be a string, a list of strings, a list of token ids (integers from 0) "
                             "or a list of such lists") from None
        items = cls.items_of(v)
        if not items:
            raise ValueError("input cannot be an empty list")
        if len(items) > EMBEDDING_MAX_INPUTS:
            raise ValueError(f"input holds {len(items)} items; up to {EMBEDDING_MAX_INPUTS} are allowed")
        if any(not item for item in items):
            raise ValueError("input cannot be an empty string" if any(isinstance(i, str) for i in items)
                             else "input cannot hold an empty list of token ids")
        return v

    @staticmethod
    def items_of(v) -> list[str] | list[list[int]]:
        """One entry per input: a text, or one text's token ids."""
        if isinstance(v, str) or (v and isinstance(v[0], int)):
            return [v]
        return list(v)

    def inputs(self) -> list[str] | list[list[int]]:
        return self.items_of(self.input)


class EmbeddingData(BaseModel):
    index: int
    object: Literal["embedding"]
    embedding: list[float] | str  # base64: the little-endian float32 bytes


class EmbeddingUsage(BaseModel):  # vLLM's UsageInfo, field for field
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int
    prompt_tokens_details: None = None
    completion_tokens_details: None = None


class EmbeddingResponse(BaseModel):
    """What serving/embeddings.py answers: vLLM's EmbeddingResponse, field for field."""
    id: str
    object: Literal["list"]
    created: int
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage
