"""/v1: OpenAI's model list, chat and text completions, moderations and embeddings."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from serving.auth import require_user
from serving.catalog import model_list
from serving.chat import ChatService
from serving.completions import CompletionService
from serving.embeddings import EmbeddingService
from serving.errors import errors
from serving.gate import ClientGone, cancel_on_disconnect
from serving.moderations import ModerationService
from serving.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    ModerationRequest,
    TextCompletion,
)
from serving.state import State

router = APIRouter()


def _chat(request: Request) -> ChatService:
    return request.app.state.chat


def _moderation(request: Request) -> ModerationService:
    return request.app.state.moderation


@router.get("/v1/models", responses=errors(503))
async def models(request: Request, state: State):
    require_user(request, state.keys.users)
    state.require_ready()
    return model_list(state)


async def _generate(service, body, request: Request, state) -> Response:
    """Chat and text completions alike: the key, readiness and rate limit, then the request, cancelled
    when its client leaves."""
    who = require_user(request, state.keys.users)
    state.require_ready()
    service.check_rate(body.model, who)
    try:
        return await cancel_on_disconnect(request.receive, service.handle(body, who if state.keys.users else None))
    except ClientGone:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


@router.post("/v1/chat/completions", response_model=ChatCompletion,
             responses={200: {"content": {"text/event-stream": {}}}, **errors(404, 429, 503, 504)})
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State,
                           chat: Annotated[ChatService, Depends(_chat)]):
    return await _generate(chat, body, request, state)


def _completions(request: Request) -> CompletionService:
    return request.app.state.completions


@router.post("/v1/completions", response_model=TextCompletion,
             responses={200: {"content": {"text/event-stream": {}}}, **errors(404, 429, 503, 504)})
async def completions(body: CompletionRequest, request: Request, state: State,
                      service: Annotated[CompletionService, Depends(_completions)]):
    return await _generate(service, body, request, state)


@router.post("/v1/moderations")
async def moderations(body: ModerationRequest, request: Request, state: State,
                      moderation: Annotated[ModerationService, Depends(_moderation)]):
    require_user(request, state.keys.users)
    return await moderation.handle(body)


def _embeddings(request: Request) -> EmbeddingService:
    return request.app.state.embeddings


# No require_ready(): the encoder runs in this process, not in the engine, so embeddings are served while
# the engine starts or restarts. The per-key rate limit counts these requests as it counts chat's.
@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=errors(404, 429, 503, 504))
async def embeddings(body: EmbeddingRequest, request: Request, state: State,
                     service: Annotated[EmbeddingService, Depends(_embeddings)]):
    state.limiter.check(require_user(request, state.keys.users))
    try:
        return await cancel_on_disconnect(request.receive, service.handle(body))
    except ClientGone:
        return Response(status_code=499)
