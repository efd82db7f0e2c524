"""The probes (/health, /ready: open to all) and the ops pages (/metrics, /dashboard: any key once keys are
set, which the request gate checks)."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import REGISTRY, generate_latest

from serving.state import State

DASHBOARD = Path(__file__).parent.parent / "dashboard"
probes = APIRouter()
pages = APIRouter()


@probes.get("/health")
async def health(state: State):
    return {"status": "ok", "uptime_s": round(time.time() - state.started_at, 1)}


@probes.get("/ready", responses={503: {"description": "not ready", "content": {"application/json": {"schema": {
    "type": "object", "required": ["ready"], "properties": {"ready": {"const": False}}}}}}})
async def ready(state: State):
    if not state.ready or not state.engine.ready():
        return JSONResponse({"ready": False}, status_code=503)
    return {"ready": True, "engine": state.engine.name, "tasks": sorted(state.registry.tasks)}


@pages.get("/metrics", response_class=PlainTextResponse)
async def metrics(state: State):
    return Response(generate_latest(state.metrics.registry) + generate_latest(REGISTRY),
                    media_type="text/plain; version=0.0.4")


@pages.get("/dashboard", response_class=HTMLResponse)
async def dashboard():
    return FileResponse(DASHBOARD / "index.html")


@pages.get("/dashboard/data")
async def dashboard_data(state: State, since: float = 0.0):
    reg = state.registry
    canaries = {} if reg is None else {t: {"share": c.share, "stable": reg.tasks[t].ref.name, "canary": c.slot.ref.name}
                                       for t, c in reg.canaries.items()}
    return {"now": time.time(), "records": state.metrics.recent(since),
            "queue": {"waiting": state.admission.waiting, "running": state.admission.active}, "canaries": canaries}


@pages.get("/dashboard/plotly.min.js", response_class=Response,
           responses={200: {"content": {"application/javascript": {}}}})
async def plotly_js():
    import plotly

    return FileResponse(Path(plotly.__file__).parent / "package_data" / "plotly.min.js",
                        media_type="application/javascript")
