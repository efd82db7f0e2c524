"""What the admin API does: swap and delete tasks, run canaries, reload a stage's store, read the audit trail."""

from __future__ import annotations

import asyncio
import contextlib

from guardrails.audit import audit_page
from kernel.errors import GuardtuneError
from serving.errors import APIError
from serving.registry import AdapterRejected, NoCanary, StateNotSaved, TaskNotFound
from serving.state import ServerState


async def reload_stage(stages: list, name: str, missing: str) -> dict:
    """Reload a stage's store from disk; a bad one is refused and the old one keeps serving."""
    stage = next((s for s in stages if s.name == name), None)
    if stage is None:
        raise APIError(404, missing, code="not_configured")
    try:
        return await asyncio.to_thread(stage.reload)
    except GuardtuneError as exc:
        raise APIError(400, str(exc), code=f"{name}_rejected") from None


async def audit_records(state: ServerState, request_id: str | None, **query) -> dict:
    """One record by request id, or a page of them filtered by `query` (audit_page's arguments)."""
    sink = state.pipeline.audit
    if sink is None:
        raise APIError(404, "no audit store is configured (set guardrails: in the serve config)",
                       code="not_configured")
    if request_id is not None:
        record = await asyncio.to_thread(sink.store.get, request_id)
        if record is None:
            raise APIError(404, f"no audit record for request {request_id}", code="not_found")
        return record
    return await asyncio.to_thread(audit_page, sink.store, **query)


def list_tasks(state: ServerState) -> dict:
    reg = state.registry
    return {"tasks": reg.views(), "store": {"target": reg.store.label, "shared": reg.store.shared,
                                            "version": reg.version, "error": reg.store_error}}


async def put_task(state: ServerState, task: str, adapter: str) -> dict:
    if not task.replace("-", "").replace("_", "").replace(".", "").isalnum() or len(task) > 64:
        raise APIError(400, "task names are letters, digits, '-', '_' and '.' (up to 64)", param="task")
    if task in (state.cfg.base_model, "base"):
        raise APIError(400, f"'{task}' names the base model", param="task")
    with _answers():
        slot = await state.registry.put(task, adapter)
    return slot.summary()


async def delete_task(state: ServerState, task: str) -> dict:
    with _answers():
        await state.registry.delete(task)
    return {"deleted": task}


async def put_canary(state: ServerState, task: str, adapter: str, share: float) -> dict:
    with _answers():
        await state.registry.put_canary(task, adapter, share)
    return state.registry.view(task)


async def promote_canary(state: ServerState, task: str) -> dict:
    with _answers():
        await state.registry.promote(task)
    return state.registry.view(task)


async def rollback_canary(state: ServerState, task: str) -> dict:
    with _answers():
        await state.registry.rollback(task)
    return state.registry.view(task)


@contextlib.contextmanager
def _answers():
    """The registry's refusals as the admin API's errors."""
    try:
        yield
    except TaskNotFound as exc:
        raise APIError(404, str(exc), param="task", code="task_not_found") from None
    except NoCanary as exc:
        raise APIError(404, str(exc), param="task", code="canary_not_found") from None
    except AdapterRejected as exc:
        raise APIError(exc.status, str(exc), param="adapter", code="adapter_rejected") from None
    except StateNotSaved as exc:
        raise APIError(500, str(exc), code="state_write_failed") from None
