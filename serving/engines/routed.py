"""vLLM for the base model and LoRA tasks; the transformers engine for the adapters vLLM cannot serve.

vLLM 0.32 refuses DoRA ("does not yet support DoRA") and has no kernels for prompt, prefix or
adaption-prompt adapters. Their manifests say `serve_with: transformers`; on a vLLM server such a
task is decoded by a transformers engine started the first time one is loaded, so every method
`train` produces can be served by the default server. The base model never leaves vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator, Callable

from serving.engines.base import AdapterRef, Delta, Engine, GenParams

log = logging.getLogger("guardtune.serve")


class RoutedEngine:
    def __init__(self, primary: Engine, make_secondary: Callable[[], Engine]):
        self.primary, self._make_secondary = primary, make_secondary
        self.secondary: Engine | None = None
        self._starting = asyncio.Lock()
        self._on_secondary: set[int] = set()  # adapter ids loaded on the secondary

    @property
    def name(self) -> str:
        return self.primary.name

    def serves(self, engine: str) -> bool:
        return engine in (self.primary.name, "transformers")

    def _for(self, adapter: AdapterRef | None) -> Engine:
        if adapter is not None and adapter.engine != self.primary.name:
            return self.secondary
        return self.primary

    async def _secondary(self, adapter: AdapterRef) -> Engine:
        async with self._starting:  # two first loads at once start one engine
            if self.secondary is None:
                t0 = time.time()
                engine = self._make_secondary()
                await engine.start()
                self.secondary = engine
                log.info("transformers engine started beside %s in %.1f s, for %s", self.primary.name,
                         time.time() - t0, adapter.name)
        return self.secondary

    async def start(self) -> None:
        await self.primary.start()

    def ready(self) -> bool:
        return self.primary.ready() and (self.secondary is None or self.secondary.ready())

    async def restart(self) -> None:
        """After the primary died: a fresh primary. The secondary runs in this process and did not die; it
        keeps its adapters, and the caller's reload of every adapter skips the ones it holds."""
        await self.primary.restart()

    def unsupported(self, params: GenParams, adapter: AdapterRef | None) -> list[str]:
        engine = self._for(adapter)
        return params.extras() if engine is None else engine.unsupported(params, adapter)  # None: not started yet

    async def generate(self, request_id: str, prompt_ids: list[int], params: GenParams,
                       adapter: AdapterRef | None) -> AsyncIterator[Delta]:
        # Closed with this generator, at once: the engine's own close aborts the request.
        async with contextlib.aclosing(self._for(adapter).generate(request_id, prompt_ids, params, adapter)) as gen:
            async for delta in gen:
                yield delta

    async def load_adapter(self, adapter: AdapterRef) -> None:
        if adapter.engine != self.primary.name:
            if adapter.lora_id not in self._on_secondary:
                await (await self._secondary(adapter)).load_adapter(adapter)
                self._on_secondary.add(adapter.lora_id)
        else:
            await self.primary.load_adapter(adapter)

    async def unload_adapter(self, adapter: AdapterRef) -> None:
        await self._for(adapter).unload_adapter(adapter)
        self._on_secondary.discard(adapter.lora_id)

    async def shutdown(self) -> None:
        async with self._starting:  # a secondary being started is shut down too
            if self.secondary is not None:
                await self.secondary.shutdown()
        await self.primary.shutdown()

    def __getattr__(self, name: str):  # engine-specific attributes (load_seconds, llm) are the primary's
        if name in ("primary", "secondary", "_make_secondary", "_starting", "_on_secondary"):
            raise AttributeError(name)
        return getattr(self.primary, name)
