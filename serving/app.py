"""The FastAPI app: the server's state, the request gate, one error schema, and the routers."""

from __future__ import annotations

from fastapi import FastAPI

from kernel import __version__
from serving.chat import ChatService
from serving.completions import CompletionService
from serving.config import ServeConfig
from serving.embeddings import EmbeddingService
from serving.engines.base import Engine
from serving.errors import document_errors, errors, install_handlers
from serving.gate import RequestGate
from serving.moderations import ModerationService
from serving.pipeline import Pipeline
from serving.routes import admin, openai, ops
from serving.startup import default_pipeline, lifespan
from serving.state import ServerState


def create_app(cfg: ServeConfig, *, engine: Engine | None = None, pipeline: Pipeline | None = None) -> FastAPI:
    state = ServerState.build(cfg, engine=engine, pipeline=pipeline or default_pipeline(cfg))
    keys = state.keys
    app = FastAPI(title="guardtune", version=__version__, lifespan=lifespan)
    app.state.gt = state
    app.state.chat = ChatService(state)
    app.state.completions = CompletionService(state)
    app.state.moderation = ModerationService(state)
    app.state.embeddings = EmbeddingService(state)
    install_handlers(app)
    # Keys by path prefix, then the body under a size cap and a deadline (serving/gate.py).
    app.add_middleware(RequestGate, keys=keys, max_body_bytes=cfg.limits.max_body_bytes,
                       body_timeout_s=cfg.limits.body_timeout_s)
    document_errors(app, user_auth=bool(keys.users), admin_auth=keys.admin is not None)
    app.include_router(ops.probes)
    # The gate asks for a key on the ops pages once keys are set.
    app.include_router(ops.pages, responses=errors(401) if keys.any else None)
    app.include_router(openai.router)
    app.include_router(admin.router)
    return app
