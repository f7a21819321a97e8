"""GET /healthz (liveness), GET /readyz (models loaded and database reachable), GET /metrics (Prometheus)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.metrics import render_metrics
from service.quota_metrics import render_database_metrics
from service.schemas import FastJSONResponse

DB_PING_TIMEOUT_S = 2.0

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def _database_ok(request: Request) -> bool:
    db: Any = getattr(request.app.state, "db", None)
    if db is None:
        return False
    try:
        # The ping runs in a thread: a hung database costs this request its timeout, never the event loop.
        return bool(await asyncio.wait_for(asyncio.to_thread(db.ping), DB_PING_TIMEOUT_S))
    except Exception:
        return False


@router.get(
    "/readyz",
    summary="Readiness: models loaded and database reachable (503 otherwise)",
    responses={503: {"description": "Not ready: no model loaded, or the database is unreachable."}},
)
async def readyz(request: Request) -> Response:
    registry = getattr(request.app.state, "models", None)
    models = registry.names() if registry is not None else []
    database = await _database_ok(request)
    ready = bool(models) and database
    body = {
        "status": "ready" if ready else "not ready",
        "models": models,
        "database": "ok" if database else "unreachable",
    }
    return FastJSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus_metrics(request: Request) -> Response:
    settings = getattr(request.app.state, "settings", None)
    if settings is not None and not settings.expose_metrics:
        return FastJSONResponse({"detail": "Not Found"}, status_code=404)
    data, content_type = await asyncio.to_thread(render_metrics)
    data += await render_database_metrics(getattr(request.app.state, "db", None))
    return Response(content=data, media_type=content_type)
