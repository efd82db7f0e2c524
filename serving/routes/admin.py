"""/admin: tasks, their adapters and canaries, stage reloads, the audit trail. Every route needs the admin key
(or, with none set, a direct loopback caller)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from guardrails import outcomes
from serving import admin
from serving.auth import require_admin
from serving.errors import errors
from serving.protocol import CanaryPut, TaskPut
from serving.state import State

router = APIRouter()


@router.post("/admin/scripts/reload", responses=errors(404))
async def reload_scripts(request: Request, state: State):
    require_admin(request, state.keys.admin)
    return await admin.reload_stage(state.pipeline.post, "compliance", "no compliance stage is configured")


@router.post("/admin/rag/reload", responses=errors(404))
async def reload_rag(request: Request, state: State):
    require_admin(request, state.keys.admin)
    return await admin.reload_stage(state.pipeline.pre, "retrieval",
                                    "no knowledge index is configured (rag: in the serve config)")


@router.get("/admin/audit", responses=errors(404))
async def audit(request: Request, state: State, task: str | None = None,
                outcome: Annotated[str | None, Query(pattern=outcomes.PATTERN)] = None,
                session_id: str | None = None, since: float | None = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100, offset: Annotated[int, Query(ge=0)] = 0,
                request_id: str | None = None):
    require_admin(request, state.keys.admin)
    return await admin.audit_records(state, request_id, offset=offset, limit=limit, task=task, outcome=outcome,
                                     session_id=session_id, since=since)


@router.get("/admin/tasks", responses=errors(503))
async def list_tasks(request: Request, state: State):
    require_admin(request, state.keys.admin)
    state.require_ready()
    return admin.list_tasks(state)


@router.put("/admin/tasks/{task}", responses=errors(409, 500, 503))
async def put_task(task: str, body: TaskPut, request: Request, state: State):
    require_admin(request, state.keys.admin)
    state.require_ready()
    return await admin.put_task(state, task, body.adapter)


@router.delete("/admin/tasks/{task}", responses=errors(404, 500, 503))
async def delete_task(task: str, request: Request, state: State):
    require_admin(request, state.keys.admin)
    state.require_ready()
    return await admin.delete_task(state, task)


@router.put("/admin/tasks/{task}/canary", responses=errors(404, 409, 500, 503))
async def put_canary(task: str, body: CanaryPut, request: Request, state: State):
    require_admin(request, state.keys.admin)
    state.require_ready()
    return await admin.put_canary(state, task, body.adapter, body.share)


@router.post("/admin/tasks/{task}/canary/promote", responses=errors(404, 500, 503))
async def promote_canary(task: str, request: Request, state: State):
    require_admin(request, state.keys.admin)
    state.require_ready()
    return await admin.promote_canary(state, task)


@router.delete("/admin/tasks/{task}/canary", responses=errors(404, 500, 503))
async def rollback_canary(task: str, request: Request, state: State):
    require_admin(request, state.keys.admin)
    state.require_ready()
    return await admin.rollback_canary(state, task)
