"""The FastAPI app: thin routes over ServerState (engine, registry, pipeline, limits, metrics)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from guardrails.audit import audit_page
from kernel.errors import GuardtuneError
from serving.auth import require_admin, require_user
from serving.config import ServeConfig
from serving.errors import APIError, document_errors, errors, install_handlers
from serving.gate import ClientGone, RequestGate, cancel_on_disconnect
from serving.limits import Admission, RateLimiter
from serving.metrics import RequestRecord, ServeMetrics
from serving.moderations import ModerationRequest, ModerationService
from serving.pipeline import Pipeline
from serving.protocol import ChatCompletion, ChatCompletionRequest
from serving.registry import AdapterRejected, StateNotSaved, TaskNotFound, TaskRegistry

log = logging.getLogger("guardtune.serve")
DASHBOARD = Path(__file__).parent / "dashboard"


@dataclass
class ServerState:
    cfg: ServeConfig
    engine: object = None
    registry: TaskRegistry | None = None
    renderer: object = None
    base_format: object = None
    base_dir: Path | None = None
    pipeline: Pipeline = field(default_factory=Pipeline)
    metrics: ServeMetrics = field(default_factory=ServeMetrics)
    admission: Admission | None = None
    side_admission: Admission | None = None  # requests for the transformers engine beside vLLM
    limiter: RateLimiter | None = None
    ready: bool = False
    started_at: float = field(default_factory=time.time)
    watchdog: asyncio.Task | None = None
    exit_code: int | None = None  # set when the server must stop with a failure status (on_engine_death: exit)

    def serves_base(self) -> bool:
        g = self.cfg.guardrails
        return g is None or g.base_model != "refuse"


class TaskPut(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str = Field(min_length=1, max_length=4096)


async def start_state(state: ServerState) -> None:
    """Resolve the base, start the engine, register tasks (the last committed mapping wins)."""
    from transformers import AutoTokenizer, GenerationConfig

    from kernel.models import resolve_base_model, weights_sha256
    from serving.engines import make_engine
    from serving.prompts import PromptRenderer

    cfg = state.cfg
    t0 = time.time()
    state.base_dir = base_dir = await asyncio.to_thread(resolve_base_model, cfg.base_model, log=log.info)
    tok = await asyncio.to_thread(AutoTokenizer.from_pretrained, base_dir)
    state.renderer = PromptRenderer(tok)
    eos = GenerationConfig.from_pretrained(base_dir).eos_token_id
    state.base_format = state.renderer.base_format(eos if isinstance(eos, list) else [eos])
    base_sha = await asyncio.to_thread(weights_sha256, base_dir)
    if state.engine is None:
        state.engine = make_engine(cfg, base_dir)
    await state.engine.start()
    log.info("engine %s on %s ready in %.1f s", state.engine.name, base_dir, time.time() - t0)
    state.registry = TaskRegistry(state.engine, base_sha256=base_sha, adapters_root=cfg.adapters_root,
                                  max_lora_rank=cfg.max_lora_rank, state_file=cfg.resolved_state_file(),
                                  on_swap=lambda task: state.metrics.swaps.labels(task).inc())
    committed = state.registry.committed_mapping()
    mapping = committed if committed is not None else {t: str(p) for t, p in cfg.initial_tasks().items()}
    for task, path in mapping.items():
        try:
            await state.registry.put(task, path, persist=False)
        except AdapterRejected as exc:
            log.error("task %s not served: %s", task, exc)
    log.info("serving tasks: %s", ", ".join(state.registry.tasks) or "(none)")
    if cfg.guardrails is not None or cfg.rag:
        from kernel.encoder import embed

        await asyncio.to_thread(embed, ["warm-up"])  # load the encoder now, not on the first guarded request
    state.ready = True
    state.watchdog = asyncio.get_running_loop().create_task(watch_engine(state))


ENGINE_DIED_EXIT = 3


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
        if policy == "restart":
            try:
                t0 = time.time()
                await state.engine.restart()
                for slot in list(state.registry.tasks.values()):  # same ids, so fingerprints stay valid
                    await state.engine.load_adapter(slot.ref)
                log.info("engine restarted in %.1f s; serving tasks: %s", time.time() - t0,
                         ", ".join(state.registry.tasks) or "(none)")
                state.ready = True
                continue
            except Exception as exc:  # noqa: BLE001 - a failed restart falls through to exit
                log.error("engine restart failed: %s: %s", type(exc).__name__, exc)
        state.exit_code = ENGINE_DIED_EXIT
        import os
        import signal

        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn drains (in-flight streams end with their error event)
        return


def default_pipeline(cfg: ServeConfig) -> Pipeline:
    """Moderation first (a blocked input costs nothing more), then retrieval; compliance and the output
    filter after the model."""
    pipeline = Pipeline()
    g = cfg.guardrails
    if g is not None:
        from guardrails.moderation import Moderator
        from serving.stages import Audit, GuardScope, ModerationStage, OutputStage

        scope = GuardScope(g.tasks, g.base_model)
        moderator = Moderator(g.moderation)
        pipeline.pre.append(ModerationStage(moderator, scope))
        pipeline.audit = Audit(g.audit_db, scope)
        pipeline.output = OutputStage(g.output, scope)
    if cfg.rag:
        from serving.stages import RetrievalStage

        pipeline.pre.append(RetrievalStage(cfg.rag))
    if g is not None and g.compliance is not None:
        from serving.stages import ComplianceStage

        # The raw reply is scanned for leaks and banned topics with the input's own scanners.
        output_scanners = [s for s in moderator.scanners if s.name in ("pii", "banned_topics")]
        pipeline.post.append(ComplianceStage(g.compliance, scope, output_scanners))
    return pipeline


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


def create_app(cfg: ServeConfig, *, engine=None, pipeline: Pipeline | None = None) -> FastAPI:
    state = ServerState(cfg=cfg, engine=engine, pipeline=pipeline or default_pipeline(cfg))
    keys = cfg.keys()
    user_keys, admin_key = keys.users, keys.admin
    state.admission = Admission(cfg.limits.max_concurrency, cfg.limits.max_queue, cfg.limits.queue_timeout_s,
                                gauge=state.metrics.queue_depth, running_gauge=state.metrics.running)
    if cfg.engine == "vllm":  # that engine decodes one request at a time: its own queue, not vLLM's slots
        state.side_admission = Admission(1, cfg.limits.max_queue, cfg.limits.queue_timeout_s)
    state.limiter = RateLimiter(cfg.limits.rate_limit_per_min)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(start_state(state))
        task.add_done_callback(_crash_on_failure)
        app.state.startup = task
        g = cfg.guardrails
        retention = (asyncio.create_task(purge_audit(state, g.audit_retention_days))
                     if g is not None and g.audit_retention_days and state.pipeline.audit is not None else None)
        try:
            yield
        finally:
            state.ready = False
            task.cancel()
            if retention is not None:
                retention.cancel()
            if state.watchdog is not None:
                state.watchdog.cancel()
            if state.engine is not None:
                await state.engine.shutdown()
            if state.exit_code is not None:  # uvicorn would re-raise SIGTERM (a clean stop to systemd)
                import os

                logging.shutdown()
                os._exit(state.exit_code)

    app = FastAPI(title="guardtune", version="0.1.0", lifespan=lifespan)
    app.state.gt = state
    install_handlers(app)
    from serving.chat import ChatService

    chat = ChatService(state)

    # Keys by path prefix, then the body under a size cap and a deadline (serving/gate.py).
    app.add_middleware(RequestGate, keys=keys, max_body_bytes=cfg.limits.max_body_bytes,
                       body_timeout_s=cfg.limits.body_timeout_s)
    document_errors(app, user_auth=bool(user_keys), admin_auth=admin_key is not None)

    @app.get("/health")
    async def health():
        return {"status": "ok", "uptime_s": round(time.time() - state.started_at, 1)}

    @app.get("/ready", responses={503: {"description": "not ready", "content": {"application/json": {"schema": {
        "type": "object", "required": ["ready"], "properties": {"ready": {"const": False}}}}}}})
    async def ready():
        if not state.ready or not state.engine.ready():
            return JSONResponse({"ready": False}, status_code=503)
        return {"ready": True, "engine": state.engine.name, "tasks": sorted(state.registry.tasks)}

    ops_errors = errors(401) if keys.any else None  # the gate asks for a key on the ops pages once keys are set

    @app.get("/metrics", response_class=PlainTextResponse, responses=ops_errors)
    async def metrics():
        from prometheus_client import REGISTRY, generate_latest

        return Response(generate_latest(state.metrics.registry) + generate_latest(REGISTRY),
                        media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", responses=errors(503))
    async def models(request: Request):
        require_user(request, user_keys)
        _need_ready(state)
        now = int(state.started_at)
        data = [{"id": cfg.base_model, "object": "model", "created": now, "owned_by": "guardtune", "kind": "base"}
                ] if state.serves_base() else []
        # No filesystem paths here: /admin/tasks shows them to the admin.
        data += [{"id": t, "object": "model", "created": now, "owned_by": "guardtune", "kind": "task",
                  "parent": cfg.base_model, **{k: v for k, v in s.summary().items() if k != "path"}}
                 for t, s in state.registry.tasks.items()]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", response_model=ChatCompletion,
              responses={200: {"content": {"text/event-stream": {}}}, **errors(404, 429, 503, 504)})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        who = require_user(request, user_keys)
        caller = who if user_keys else None
        _need_ready(state)
        try:
            state.limiter.check(who)
        except APIError as exc:
            known = state.registry is not None and body.model in state.registry.tasks
            label = body.model if known else "base" if body.model in (cfg.base_model, "base") else "unknown"
            state.metrics.observe(RequestRecord(time.time(), label, exc.status, exc.code, 0, 0, 0.0, None))
            raise
        try:
            return await cancel_on_disconnect(request.receive, chat.handle(body, caller))
        except ClientGone:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    moderations_service = ModerationService(state)

    @app.post("/v1/moderations")
    async def moderations(body: ModerationRequest, request: Request):
        require_user(request, user_keys)
        return await moderations_service.handle(body)

    async def reload_stage(request: Request, stages: list, name: str, missing: str):
        """Reload a stage's store from disk; a bad one is refused and the old one keeps serving."""
        require_admin(request, admin_key)
        stage = next((s for s in stages if s.name == name), None)
        if stage is None:
            raise APIError(404, missing, code="not_configured")
        try:
            return await asyncio.to_thread(stage.reload)
        except GuardtuneError as exc:
            raise APIError(400, str(exc), code=f"{name}_rejected") from None

    @app.post("/admin/scripts/reload", responses=errors(404))
    async def reload_scripts(request: Request):
        return await reload_stage(request, state.pipeline.post, "compliance", "no compliance stage is configured")

    @app.post("/admin/rag/reload", responses=errors(404))
    async def reload_rag(request: Request):
        return await reload_stage(request, state.pipeline.pre, "retrieval",
                                  "no knowledge index is configured (rag: in the serve config)")

    @app.get("/admin/audit", responses=errors(404))
    async def audit(request: Request, task: str | None = None, outcome: str | None = None,
                    session_id: str | None = None, since: float | None = None,
                    limit: Annotated[int, Query(ge=1, le=1000)] = 100, offset: Annotated[int, Query(ge=0)] = 0,
                    request_id: str | None = None):
        require_admin(request, admin_key)
        sink = state.pipeline.audit
        if sink is None:
            raise APIError(404, "no audit store is configured (set guardrails: in the serve config)",
                           code="not_configured")
        if request_id is not None:
            record = await asyncio.to_thread(sink.store.get, request_id)
            if record is None:
                raise APIError(404, f"no audit record for request {request_id}", code="not_found")
            return record
        return await asyncio.to_thread(audit_page, sink.store, offset=offset, limit=limit, task=task,
                                       outcome=outcome, session_id=session_id, since=since)

    @app.get("/admin/tasks", responses=errors(503))
    async def list_tasks(request: Request):
        require_admin(request, admin_key)
        _need_ready(state)
        return {"tasks": [s.summary() for s in state.registry.tasks.values()]}

    @app.put("/admin/tasks/{task}", responses=errors(409, 500, 503))
    async def put_task(task: str, body: TaskPut, request: Request):
        require_admin(request, admin_key)
        _need_ready(state)
        if not task.replace("-", "").replace("_", "").replace(".", "").isalnum() or len(task) > 64:
            raise APIError(400, "task names are letters, digits, '-', '_' and '.' (up to 64)", param="task")
        if task in (cfg.base_model, "base"):
            raise APIError(400, f"'{task}' names the base model", param="task")
        try:
            slot = await state.registry.put(task, body.adapter)
        except AdapterRejected as exc:
            raise APIError(exc.status, str(exc), param="adapter", code="adapter_rejected") from None
        except StateNotSaved as exc:
            raise _not_saved(exc) from None
        return slot.summary()

    @app.delete("/admin/tasks/{task}", responses=errors(404, 500, 503))
    async def delete_task(task: str, request: Request):
        require_admin(request, admin_key)
        _need_ready(state)
        try:
            await state.registry.delete(task)
        except TaskNotFound as exc:
            raise APIError(404, str(exc), param="task", code="task_not_found") from None
        except StateNotSaved as exc:
            raise _not_saved(exc) from None
        return {"deleted": task}

    @app.get("/dashboard", response_class=HTMLResponse, responses=ops_errors)
    async def dashboard():
        return FileResponse(DASHBOARD / "index.html")

    @app.get("/dashboard/data", responses=ops_errors)
    async def dashboard_data(since: float = 0.0):
        return {"now": time.time(), "records": state.metrics.recent(since),
                "queue": {"waiting": state.admission.waiting, "running": state.admission.active}}

    @app.get("/dashboard/plotly.min.js", response_class=Response,
             responses={200: {"content": {"application/javascript": {}}}, **(ops_errors or {})})
    async def plotly_js():
        import plotly

        return FileResponse(Path(plotly.__file__).parent / "package_data" / "plotly.min.js",
                            media_type="application/javascript")

    return app


def _need_ready(state: ServerState) -> None:
    if not state.ready or not state.engine.ready():  # the engine's own view catches a death at once
        raise APIError(503, "engine is not ready", code="not_ready", headers={"Retry-After": "5"})


def _not_saved(exc: StateNotSaved) -> APIError:
    return APIError(500, str(exc), code="state_write_failed")


def _crash_on_failure(task: asyncio.Task) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        msg = str(exc) if isinstance(exc, GuardtuneError) else f"{type(exc).__name__}: {exc}"
        log.error("start-up failed: %s", msg)
        # Exit for the supervisor rather than serve 503 forever.
        import os
        import signal

        os.kill(os.getpid(), signal.SIGTERM)
