"""The platform's app: settings, the pieces they build, and the FastAPI app that serves the API and page."""

from __future__ import annotations

import logging
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobs import api
from jobs.executors.base import Executor
from jobs.executors.kubernetes import KubernetesExecutor, KubernetesRuns
from jobs.executors.local import LocalExecutor
from jobs.promote import GatePolicy
from jobs.queue import Queue
from jobs.store import open_store

log = logging.getLogger("guardtune.platform")


@dataclass
class Settings:
    workdir: Path  # config paths are relative to it; jobs/, runs/ and adapters/ go under it
    store: str = ""  # default <workdir>/platform.db; or a postgresql:// URL shared by instances
    instance: str = ""  # this instance's name in the store (default: the host name); keep it across restarts
    admin_key: str | None = None  # None: the API answers loopback callers only
    serve_url: str | None = None  # where promotions go by default
    serve_admin_key: str | None = None
    audit_db: str | None = None  # serving's audit store (file or URL), for the bad-case loop
    max_running: int = 1
    device: str = "cpu"  # what the memory estimate assumes
    poll_s: float = 1.0
    swanlab_url: str | None = None  # a `swanlab watch` dashboard, linked from each job
    executor: str = "local"  # or "kubernetes": a Job (one node) or PyTorchJob (several) per job
    k8s: dict = field(default_factory=dict)  # KubernetesExecutor's settings: namespace, image, pvc, gpus_per_node
    gate: GatePolicy = field(default_factory=GatePolicy)


@dataclass
class Platform:
    settings: Settings
    queue: Queue
    executor: Executor


def build(settings: Settings) -> Platform:
    workdir = settings.workdir.resolve()
    settings.workdir = workdir
    store = open_store(settings.store or workdir / "platform.db")
    executor = _executor(settings, workdir)
    queue = Queue(store, executor, instance=settings.instance or socket.gethostname(),
                  max_running=settings.max_running, poll_s=settings.poll_s)
    return Platform(settings, queue, executor)


def _executor(settings: Settings, workdir: Path) -> Executor:
    if settings.executor == "kubernetes":
        k8s = dict(settings.k8s)
        gpus = int(k8s.pop("gpus_per_node", 0))
        # The volume is mounted on the platform's host at its workdir, so job paths mean the same there.
        return KubernetesRuns(KubernetesExecutor(mount_path=str(workdir), **k8s), workdir / "jobs", gpus_per_node=gpus)
    return LocalExecutor(workdir / "jobs", workdir)


def create_app(settings: Settings) -> FastAPI:
    platform = build(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        platform.queue.tick()  # at once: lost runs are requeued and resume before anything else starts
        platform.queue.start()
        yield
        platform.queue.stop()

    # No /docs or /openapi.json: every route here is behind the admin key (docs/platform.md lists them).
    app = FastAPI(title="guardtune platform", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.platform = platform
    app.include_router(api.router)
    app.include_router(api.pages)
    app.add_exception_handler(api.APIError, api.api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.middleware("http")(_body_limit)
    return app


async def _body_limit(request: Request, call_next):
    if int(request.headers.get("content-length") or 0) > api.MAX_BODY:
        return api.error_response(413, f"the body is over {api.MAX_BODY >> 20} MiB", "too_large")
    return await call_next(request)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return api.error_response(exc.status_code, str(exc.detail), "not_found" if exc.status_code == 404 else "http_error")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("platform: %s %s failed", request.method, request.url.path)
    return api.error_response(500, f"internal error: {type(exc).__name__}", "internal_error")


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()]
    return api.error_response(400, "; ".join(problems), problems=problems)
