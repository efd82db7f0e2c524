"""What serving needs from an engine: token ids in, text deltas out, adapters loaded by id."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol


@dataclass(frozen=True)
class GenParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class AdapterRef:
    """A loaded adapter as the engine knows it: a unique int id (never reused) and its directory."""
    name: str
    lora_id: int
    path: str


@dataclass
class Delta:
    text: str
    completion_tokens: int  # cumulative
    finish_reason: str | None = None  # "stop" | "length" once finished


class EngineDead(RuntimeError):
    pass


class Engine(Protocol):
    name: str

    async def start(self) -> None: ...
    def ready(self) -> bool: ...  # False once the engine's process has died
    async def restart(self) -> None: ...  # a fresh engine after a death; adapters are loaded again by the caller
    def generate(self, request_id: str, prompt_ids: list[int], params: GenParams,
                 adapter: AdapterRef | None) -> AsyncIterator[Delta]: ...
    async def load_adapter(self, adapter: AdapterRef) -> None: ...
    async def unload_adapter(self, adapter: AdapterRef) -> None: ...
    async def shutdown(self) -> None: ...
