"""The server's life: the default pipeline from the config, start-up in the background, the engine
watchdog, audit retention, and the orderly stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time

from fastapi import FastAPI

from guardrails.moderation import Moderator
from kernel.encoder import embed
from kernel.errors import GuardtuneError
from kernel.models import resolve_base_model, weights_sha256
from serving.config import ServeConfig
from serving.engines import make_engine
from serving.pipeline import Pipeline
from serving.prompts import PromptRenderer
from serving.registry import TaskRegistry
from serving.stages import Audit, ComplianceStage, GuardScope, ModerationStage, OutputStage, RetrievalStage
from serving.state import ServerState
from serving.task_store import open_task_store
from serving.tools import ToolReader

log = logging.getLogger("guardtune.serve")
ENGINE_DIED_EXIT = 3


def default_pipeline(cfg: ServeConfig) -> Pipeline:
    """Moderation first (a blocked input costs nothing more), then retrieval; compliance and the output
    filter after the model."""
    pipeline = Pipeline()
    g = cfg.guardrails
    if g is not None:
        scope = GuardScope(g.tasks, g.base_model)
        moderator = Moderator(g.moderation)
        pipeline.pre.append(ModerationStage(moderator, scope))
        pipeline.audit = Audit(g.audit_db, scope)
        pipeline.output = OutputStage(g.output, scope)
    if cfg.rag:
        pipeline.pre.append(RetrievalStage(cfg.rag))
    if g is not None and g.compliance is not None:
        # The raw reply is scanned for leaks and banned topics with the input's own scanners.
        output_scanners = [s for s in moderator.scanners if s.name in ("pii", "banned_topics")]
        pipeline.post.append(ComplianceStage(g.compliance, scope, output_scanners))
    return pipeline


async def start_state(state: ServerState) -> None:
    """Resolve the base, start the engine, register tasks (the last committed mapping wins)."""
    from transformers import AutoTokenizer, GenerationConfig

    cfg = state.cfg
    t0 = time.time()
    store = await asyncio.to_thread(open_task_store, cfg.task_store, cfg.resolved_state_file())  # a bad URL fails now
    state.base_dir = base_dir = await asyncio.to_thread(resolve_base_model, cfg.base_model, log=log.info)
    tok = await asyncio.to_thread(AutoTokenizer.from_pretrained, base_dir)
    state.renderer = PromptRenderer(tok)
    state.tools = await asyncio.to_thread(ToolReader, cfg.tool_call_parser, tok)  # a bad parser name fails here
    eos = GenerationConfig.from_pretrained(base_dir).eos_token_id
    state.base_format = state.renderer.base_format(eos if isinstance(eos, list) else [eos])
    base_sha = await asyncio.to_thread(weights_sha256, base_dir)
    if state.engine is None:
        state.engine = make_engine(cfg, base_dir)
    await state.engine.start()
    log.info("engine %s on %s ready in %.1f s", state.engine.name, base_dir, time.time() - t0)
    state.registry = TaskRegistry(state.engine, base_sha256=base_sha, adapters_root=cfg.adapters_root,
                                  max_lora_rank=cfg.max_lora_rank, store=store,
                                  on_swap=lambda task: state.metrics.swaps.labels(task).inc())
    await state.registry.start(cfg.initial_tasks())  # the last committed mapping wins over the config's tasks
    log.info("serving tasks: %s", ", ".join(state.registry.tasks) or "(none)")
    if cfg.guardrails is not None or cfg.rag:
        await asyncio.to_thread(embed, ["warm-up"])  # load the encoder now, not on the first guarded request
    state.ready = True
    state.watchdog = asyncio.get_running_loop().create_task(watch_engine(state))
    if store.shared:
        log.info("following task store %s every %g s", store.label, cfg.task_store_poll_s)
        state.follower = asyncio.get_running_loop().create_task(follow_task_store(state, cfg.task_store_poll_s))


async def follow_task_store(state: ServerState, every_s: float) -> None:
    """Replicas share the task mapping: apply what another replica committed, within `every_s`. Nothing here
    stops the server: a failure is logged and shown in GET /admin/tasks, and tried again."""
    while True:
        await asyncio.sleep(every_s)
        if not state.ready:  # the engine is restarting: its adapters are being loaded again
            continue
        try:
            await state.registry.sync(retry_s=5 * every_s)
        except Exception as exc:  # noqa: BLE001 - the loop outlives any one failure
            log.error("following the task store failed: %s: %s", type(exc).__name__, exc)


async def watch_engine(state: ServerState, interval: float = 0.2) -> None:
    """The engine's process can die under the server (OOM killer, a crash). Stop admitting requests at once
    (503), then either start a new engine with the same task mapping or exit non-zero for a supervisor."""
    while True:
        await asyncio.sleep(interval)
        if not state.ready or state.engine.ready():
            continue
        state.ready = False
        policy = state.cfg.on_engine_death
        log.error("engine %s died; %s", state.engine.name,
                  "restarting it" if policy == "restart" else f"exiting with status {ENGINE_DIED_EXIT}")
        if policy == "restart" and await _restart_engine(state):
            continue
        state.exit_code = ENGINE_DIED_EXIT
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn drains (in-flight streams end with their error event)
        return


async def _restart_engine(state: ServerState) -> bool:
    """A fresh engine with the same adapters; False when that fails (the server then exits)."""
    try:
        t0 = time.time()
        await state.engine.restart()
        for slot in state.registry.slots():  # tasks and canaries, same ids, so fingerprints stay valid
            await state.engine.load_adapter(slot.ref)
        log.info("engine restarted in %.1f s; serving tasks: %s", time.time() - t0,
                 ", ".join(state.registry.tasks) or "(none)")
        state.ready = True
        return True
    except Exception as exc:  # noqa: BLE001 - a failed restart falls through to exit
        log.error("engine restart failed: %s: %s", type(exc).__name__, exc)
        return False


async def purge_audit(state: ServerState, days: float, every_s: float = 3600.0) -> None:
    """Retention: at start-up, then hourly, audit records older than `days` go."""
    while True:
        try:
            n = await state.pipeline.audit.purge_older_than(days)
            if n:
                log.info("audit retention: %d records older than %g days deleted", n, days)
        except GuardtuneError as exc:
            log.error("audit retention: %s", exc)
        await asyncio.sleep(every_s)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    """Start-up runs in the background (/ready says when it is done); the stop shuts the engine down."""
    state: ServerState = app.state.gt
    task = asyncio.create_task(start_state(state))
    task.add_done_callback(_crash_on_failure)
    app.state.startup = task  # a strong reference: the loop keeps only weak ones to its tasks
    g = state.cfg.guardrails
    retention = (asyncio.create_task(purge_audit(state, g.audit_retention_days))
                 if g is not None and g.audit_retention_days and state.pipeline.audit is not None else None)
    try:
        yield
    finally:
        state.ready = False
        task.cancel()
        if retention is not None:
            retention.cancel()
        for background in (state.watchdog, state.follower):
            if background is not None:
                background.cancel()
        if state.engine is not None:
            await state.engine.shutdown()
        if state.registry is not None:
            state.registry.store.close()
        if state.exit_code is not None:  # uvicorn would re-raise SIGTERM (a clean stop to systemd)
            logging.shutdown()
            os._exit(state.exit_code)


def _crash_on_failure(task: asyncio.Task) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        msg = str(exc) if isinstance(exc, GuardtuneError) else f"{type(exc).__name__}: {exc}"
        log.error("start-up failed: %s", msg)
        os.kill(os.getpid(), signal.SIGTERM)  # exit for the supervisor rather than serve 503 forever
