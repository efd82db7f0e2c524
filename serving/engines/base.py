"""What serving needs from an engine: token ids in, text deltas out, adapters loaded by id."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol, runtime_checkable


@dataclass(frozen=True)
class GenParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)  # the format's end of turn: an EOS to ignore_eos
    # vLLM's extensions, at values that mean "off"
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0  # stop tokens and stop strings wait until this many tokens are out
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    # OpenAI's fields, at values that mean "off"
    n: int = 1  # choices per prompt: one engine request fans out
    logprobs: int | None = None  # alternatives per token to return (0: the chosen token's alone); None: no logprobs
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    json_schema: dict | None = None  # guided decoding: the reply is JSON meeting this schema
    json_object: bool = False  # guided decoding: the reply is a JSON object

    def extras(self) -> list[str]:
        """The OpenAI fields this request sets beyond plain sampling (an engine may refuse them by name)."""
        on = {"n": self.n > 1, "logprobs": self.logprobs is not None, "presence_penalty": bool(self.presence_penalty),
              "frequency_penalty": bool(self.frequency_penalty), "logit_bias": bool(self.logit_bias),
              "response_format": self.json_schema is not None or self.json_object}
        return [k for k, v in on.items() if v]


@dataclass(frozen=True)
class AdapterRef:
    """A loaded adapter as the engine knows it: a unique int id (never reused), its directory, and the
    engine its manifest needs (`serve_with`)."""
    name: str
    lora_id: int
    path: str
    engine: str = "vllm"


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text and logprob, and the alternatives the engine ranked (first: the
    chosen token, then by rank, as vLLM orders them)."""
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass
class Delta:
    text: str
    completion_tokens: int  # cumulative, for this choice
    finish_reason: str | None = None  # "stop" | "length" once finished
    index: int = 0  # the choice (n > 1)
    logprobs: list[TokenLogprob] | None = None  # one per token in this delta, when asked for


class EngineDead(RuntimeError):
    pass


class EngineRefused(ValueError):
    """The engine would not start this request (a JSON schema it cannot compile, say): the client's to fix."""


@runtime_checkable
class Engine(Protocol):
    """What every engine offers the server: vLLM, transformers, and RoutedEngine over the two."""

    @property
    def name(self) -> str: ...  # "vllm" or "transformers": the `serve_with` value it stands for

    async def start(self) -> None: ...
    def ready(self) -> bool: ...  # False once the engine's process has died
    async def restart(self) -> None: ...  # a fresh engine after a death; adapters are loaded again by the caller
    def generate(self, request_id: str, prompt_ids: list[int], params: GenParams,
                 adapter: AdapterRef | None) -> AsyncIterator[Delta]: ...
    async def load_adapter(self, adapter: AdapterRef) -> None: ...
    async def unload_adapter(self, adapter: AdapterRef) -> None: ...
    async def shutdown(self) -> None: ...
    def serves(self, engine: str) -> bool: ...  # can it serve an adapter whose manifest says serve_with `engine`
    def unsupported(self, params: GenParams, adapter: AdapterRef | None) -> list[str]: ...  # fields it cannot do
