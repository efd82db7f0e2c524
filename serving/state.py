"""One server's state: its config and keys, the engine, the task registry, the pipeline, admission and metrics.

The app holds it as `app.state.gt`; routes reach it through the `State` dependency.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from serving.config import Keys, ServeConfig
from serving.engines.base import Engine
from serving.errors import APIError
from serving.limits import Admission, RateLimiter
from serving.metrics import ServeMetrics
from serving.pipeline import Pipeline
from serving.prompts import PromptFormat, PromptRenderer
from serving.registry import TaskRegistry
from serving.tools import ToolReader


@dataclass
class ServerState:
    cfg: ServeConfig
    keys: Keys
    admission: Admission
    limiter: RateLimiter
    engine: Engine | None = None  # made at start-up from the config unless given (tests)
    side_admission: Admission | None = None  # requests for the transformers engine beside vLLM
    pipeline: Pipeline = field(default_factory=Pipeline)
    metrics: ServeMetrics = field(default_factory=ServeMetrics)
    # Set at start-up (serving/startup.py):
    registry: TaskRegistry | None = None
    renderer: PromptRenderer | None = None
    tools: ToolReader | None = None  # reads tool calls out of replies (vLLM's parser for tool_choice auto)
    base_format: PromptFormat | None = None
    base_dir: Path | None = None
    ready: bool = False
    started_at: float = field(default_factory=time.time)
    watchdog: asyncio.Task | None = None
    follower: asyncio.Task | None = None  # follows a shared task store (serving/startup.py)
    exit_code: int | None = None  # set when the server must stop with a failure status (on_engine_death: exit)

    @classmethod
    def build(cls, cfg: ServeConfig, *, engine: Engine | None = None, pipeline: Pipeline) -> ServerState:
        """The state before start-up: keys read once, admission queues and the rate limiter from the limits."""
        metrics, limits = ServeMetrics(), cfg.limits
        admission = Admission(limits.max_concurrency, limits.max_queue, limits.queue_timeout_s,
                              gauge=metrics.queue_depth, running_gauge=metrics.running)
        # The transformers engine beside vLLM decodes one request at a time: its own queue, not vLLM's slots.
        side = Admission(1, limits.max_queue, limits.queue_timeout_s) if cfg.engine == "vllm" else None
        return cls(cfg=cfg, keys=cfg.keys(), admission=admission, limiter=RateLimiter(limits.rate_limit_per_min),
                   engine=engine, side_admission=side, pipeline=pipeline, metrics=metrics)

    def serves_base(self) -> bool:
        g = self.cfg.guardrails
        return g is None or g.base_model != "refuse"

    def require_ready(self) -> None:
        if not self.ready or not self.engine.ready():  # the engine's own view catches a death at once
            raise APIError(503, "engine is not ready", code="not_ready", headers={"Retry-After": "5"})


def server_state(request: Request) -> ServerState:
    return request.app.state.gt


State = Annotated[ServerState, Depends(server_state)]
