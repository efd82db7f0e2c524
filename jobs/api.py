"""The platform's HTTP API (/api/...) and its page: thin routes over the queue, store and promotion.

Every route needs the admin key (`Authorization: Bearer ...`); without one configured, only direct
loopback callers are answered. Errors are OpenAI-shaped: {"error": {"message", "type", "code"}},
plus "problems" (one line each) for a config that does not validate.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from jobs import progress
from jobs.loop import badcase_job
from jobs.model import FINISHED, Job
from jobs.promote import gate, promote, replay_check
from jobs.submit import BadJob, make_job, parse_body, predicted_peak, problems_of
from kernel.errors import GuardtuneError
from kernel.openai_errors import error_message
from training.config import resolve_paths

PAGE = Path(__file__).parent / "page"
LOG_CHUNK = 65536
MAX_BODY = 1 << 20
# A request that carries any of these came through a proxy: its socket peer says nothing about the client.
FORWARDING = ("forwarded", "x-forwarded-for", "x-real-ip", "x-forwarded-host")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")  # a Host header naming anything else: DNS rebinding
TASK = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, **extra):
        self.status, self.message, self.code, self.extra = status, message, code, extra


def error_response(status: int, message: str, code: str = "invalid_request", **extra) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code, **extra}},
                        status_code=status)


async def api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.code, **exc.extra)


def platform_of(request: Request):
    p = request.app.state.platform
    key = p.settings.admin_key
    if key is None:
        client = request.client.host if request.client else ""
        host = _host_name(request.headers.get("host", ""))
        if client not in ("127.0.0.1", "::1") or any(h in request.headers for h in FORWARDING) \
                or host not in LOOPBACK_HOSTS:
            raise APIError(403, "the platform answers direct loopback callers only until an admin key is set "
                                "(GUARDTUNE_ADMIN_KEY)", "admin_disabled")
        return p
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(401, "missing or invalid admin key", "invalid_admin_key")
    return p


def _host_name(host: str) -> str:
    """The Host header without its port ("[::1]:8100" -> "[::1]")."""
    return host.split("]", 1)[0] + "]" if host.startswith("[") else host.rsplit(":", 1)[0]


Platform = Annotated[object, Depends(platform_of)]
router = APIRouter(prefix="/api")
pages = APIRouter()


class PromoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str = Field(pattern=TASK)
    serve_url: str | None = Field(None, description="default: the platform's --serve-url")
    canary_share: float | None = Field(None, gt=0, lt=1, description="a share of the task's traffic, sticky per session")


@router.post("/jobs", status_code=201)
async def submit(request: Request, p: Platform):
    raw = await _raw(request)
    try:
        job = make_job(raw, p.settings.workdir, device=p.settings.device)
    except BadJob as exc:
        raise APIError(400, "the config does not validate: " + "; ".join(exc.problems), "invalid_config",
                       problems=exc.problems) from None
    await asyncio.to_thread(p.queue.submit, job)
    return {"id": job.id, "state": job.state}


@router.post("/jobs/validate")
async def check(request: Request, p: Platform):
    """The page's live check: the schema's problems and the memory estimate, nothing queued."""
    try:
        raw = await _raw(request)
        resolve_paths(raw, p.settings.workdir)
        problems_of(raw)
    except BadJob as exc:
        return {"ok": False, "problems": exc.problems, "estimate_bytes": None}
    return {"ok": True, "problems": [], "estimate_bytes": predicted_peak(raw, p.settings.device)}


@router.get("/jobs")
def list_jobs(p: Platform, limit: int = 100):
    return {"jobs": [_summary(j) for j in p.queue.store.list(limit=max(1, min(limit, 500)))]}


@router.get("/jobs/{job_id}")
def get_job(job_id: str, p: Platform):  # a plain def: reading the metrics file runs in the thread pool
    job = _job(p, job_id)
    prog = progress.read(job.run_dir, p.executor.log_path(job), job.config)
    return {**_summary(job), "config": job.config, "progress": prog, "manifest": _manifest(job),
            "swanlab": _swanlab(p, job), "error": job.error, "promoted": job.promoted, "rss_samples": job.rss_samples}


@router.get("/jobs/{job_id}/logs", response_class=StreamingResponse,
            responses={200: {"content": {"text/plain": {}}}})
async def logs(job_id: str, p: Platform, follow: bool = False, offset: int = 0):
    job = _job(p, job_id)
    path = p.executor.log_path(job)
    return StreamingResponse(_tail(p, job.id, path, max(offset, 0), follow), media_type="text/plain")


@router.post("/jobs/{job_id}/cancel")
async def cancel(job_id: str, p: Platform):
    _job(p, job_id)
    job = await asyncio.to_thread(p.queue.cancel, job_id)
    return _summary(job)


@router.post("/jobs/{job_id}/promote")
async def promote_job(job_id: str, body: PromoteBody, p: Platform):
    job = _job(p, job_id)
    url = body.serve_url or p.settings.serve_url
    if not url:
        raise APIError(400, "no serve_url given and the platform has no --serve-url", "no_serve_url")
    checks = gate(job, p.settings.gate)
    if all(c.passed for c in checks):  # the replay loads the candidate on serving: only a sound one
        checks.append(await asyncio.to_thread(replay_check, job, body.task, p.settings.gate, p.settings.audit_db,
                                              url, _serve_key(p, url)))
    report = [c.__dict__ for c in checks]
    failed = [c for c in checks if not c.passed]
    if failed:
        raise APIError(409, "the eval gate refused: " + "; ".join(f"{c.name}: {c.detail}" for c in failed),
                       "gate_failed", gate=report)
    try:
        served = await asyncio.to_thread(promote, job, body.task, url, _serve_key(p, url),
                                         canary_share=body.canary_share)
    except GuardtuneError as exc:
        raise APIError(502, str(exc), "serving_refused", gate=report) from None
    with p.queue.lock:
        fresh = p.queue.store.get(job.id)
        fresh.promoted = job.promoted
        p.queue.store.save(fresh)
    return {"gate": report, "serving": served}


class LoopBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str = Field(pattern=TASK)
    audit_db: str | None = Field(None, description="serving's audit store; default: the platform's --audit-db")
    since_hours: float = Field(24.0, gt=0)
    max_steps: int = Field(50, ge=1)
    beta: float = Field(0.1, gt=0)
    config: dict = Field(default_factory=dict, description="more train keys for the DPO job")


@router.post("/loop/dpo", status_code=201)
async def badcases_to_dpo(body: LoopBody, p: Platform):
    """Recent bad cases of a task -> a queued DPO job (promote it like any job once it succeeds)."""
    audit_db = body.audit_db or p.settings.audit_db
    if not audit_db:
        raise APIError(400, "no audit_db given and the platform has no --audit-db", "no_audit_db")
    try:
        job, export = await asyncio.to_thread(badcase_job, audit_db, body.task, p.settings.workdir,
                                              device=p.settings.device, since_hours=body.since_hours,
                                              max_steps=body.max_steps, beta=body.beta, extra=body.config)
    except BadJob as exc:
        raise APIError(400, "; ".join(exc.problems), "no_dpo_job", problems=exc.problems) from None
    except GuardtuneError as exc:  # the audit store could not be read
        raise APIError(400, str(exc), "audit_unreadable") from None
    await asyncio.to_thread(p.queue.submit, job)
    return {"id": job.id, "state": job.state, "export": export.summary(), "train_file": job.config["train_file"]}


@router.post("/tasks/{task}/canary/promote")
async def canary_promote(task: Annotated[str, PathParam(pattern=TASK)], p: Platform):
    """The canary's adapter becomes the task's only one (serving's admin API, through the platform)."""
    return await asyncio.to_thread(_serving, p, "POST", f"/admin/tasks/{quote(task, safe='')}/canary/promote")


@router.delete("/tasks/{task}/canary")
async def canary_rollback(task: Annotated[str, PathParam(pattern=TASK)], p: Platform):
    """Roll the canary back: all of the task's traffic to the stable adapter again."""
    return await asyncio.to_thread(_serving, p, "DELETE", f"/admin/tasks/{quote(task, safe='')}/canary")


@router.get("/settings")
async def settings(p: Platform):
    s = p.settings
    return {"serve_url": s.serve_url, "device": s.device, "max_running": s.max_running, "swanlab_url": s.swanlab_url}


@pages.get("/", include_in_schema=False)
async def page():
    return FileResponse(PAGE / "index.html")


@pages.get("/plotly.min.js", include_in_schema=False)
async def plotly_js():
    import plotly  # the charting library the serving dashboard already ships, served offline

    return FileResponse(Path(plotly.__file__).parent / "package_data" / "plotly.min.js",
                        media_type="application/javascript")


async def _raw(request: Request) -> dict:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("application/json", "application/yaml", "application/x-yaml", "text/yaml"):
        # A form or text/plain POST needs no CORS preflight: refusing it keeps other web pages out.
        raise APIError(415, "send the config as application/json or application/yaml", "unsupported_media_type")
    body = await _body(request)
    try:
        return parse_body(body, ctype)
    except BadJob as exc:
        raise APIError(400, "; ".join(exc.problems), "invalid_body", problems=exc.problems) from None


async def _body(request: Request) -> bytes:
    """The body, refused past MAX_BODY before it is all read."""
    if int(request.headers.get("content-length") or 0) > MAX_BODY:
        raise APIError(413, f"the body is over {MAX_BODY >> 20} MiB", "too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise APIError(413, f"the body is over {MAX_BODY >> 20} MiB", "too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _serve_key(p, url: str) -> str | None:
    """Serving's admin key goes to the configured serving only, never to a URL a caller names."""
    return p.settings.serve_admin_key if url == p.settings.serve_url else None


def _serving(p, method: str, path: str) -> dict:
    url = p.settings.serve_url
    if not url:
        raise APIError(400, "the platform has no --serve-url", "no_serve_url")
    headers = {"Authorization": f"Bearer {p.settings.serve_admin_key}"} if p.settings.serve_admin_key else {}
    try:
        r = httpx.request(method, url.rstrip("/") + path, headers=headers, timeout=600)
    except httpx.HTTPError as exc:
        raise APIError(502, f"serving at {url} did not answer: {exc}", "serving_unreachable") from None
    if r.status_code >= 400:
        raise APIError(502, f"serving refused ({r.status_code}): {error_message(r)}", "serving_refused")
    return r.json()


def _job(p, job_id: str) -> Job:
    job = p.queue.store.get(job_id)
    if job is None:
        raise APIError(404, f"no job {job_id!r}", "job_not_found")
    return job


def _summary(job: Job) -> dict:
    return {"id": job.id, "task": job.task, "state": job.state, "created": job.created, "started": job.started,
            "finished": job.finished, "waiting_for": job.waiting_for, "attempts": job.attempts,
            "estimate_bytes": job.estimate_bytes, "peak_rss_bytes": job.peak_rss_bytes,
            "adapter_dir": job.adapter_dir, "run_dir": job.run_dir, "exit_code": job.exit_code}


def _manifest(job: Job) -> dict | None:
    try:
        return json.loads((Path(job.adapter_dir) / "guardtune.json").read_text())
    except (OSError, ValueError):
        return None


def _swanlab(p, job: Job) -> dict | None:
    if "swanlab" not in str(job.config.get("report_to", "")):
        return None
    logdir = Path(job.run_dir) / "swanlog"
    return {"logdir": str(logdir), "watch": f"swanlab watch {logdir}", "url": p.settings.swanlab_url}


async def _tail(p, job_id: str, path: Path, offset: int, follow: bool):
    while True:
        try:
            with path.open("rb") as fh:
                fh.seek(offset)
                chunk = fh.read(LOG_CHUNK)
        except FileNotFoundError:
            chunk = b""
        if chunk:
            offset += len(chunk)
            yield chunk
            continue
        job = await asyncio.to_thread(p.queue.store.get, job_id)
        if not follow or job is None or job.state in FINISHED:
            return
        await asyncio.sleep(0.5)


