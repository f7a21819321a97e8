"""GET /healthz (liveness), /readyz (models, database, Redis), /metrics (Prometheus), and / (to the docs)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from service.core.state import ServiceState, StateDep
from service.db.session import Database
from service.limits.redis_backend import RedisBackend, render_redis_metrics
from service.observability.metrics import render_metrics
from service.observability.quota_metrics import render_database_metrics
from service.schemas import FastJSONResponse

DB_PING_TIMEOUT_S = 2.0

router = APIRouter(tags=["health"])


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    """The root has nothing of its own: send people to the API documentation."""
    return RedirectResponse("/docs")


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def _database_state(db: Database) -> str:
    """The database state for /readyz: ok, full, read-only or unreachable (Database.probe)."""
    try:
        # The probe runs in a thread: a hung database costs this request its timeout, never the event loop.
        return str(await asyncio.wait_for(asyncio.to_thread(db.probe), DB_PING_TIMEOUT_S))
    except Exception:
        return "unreachable"


async def _redis_state(redis: RedisBackend | None) -> str:
    if redis is None:
        return "off"
    return "ok" if await redis.ping() else "unreachable"


@router.get(
    "/readyz",
    summary="Readiness: models loaded, database takes a write and, with SDB_REDIS_URL, Redis (503 otherwise)",
    responses={
        503: {
            "description": "Not ready: no model loaded, the database does not take a committed write "
            "(`database`: `full`, `read-only` or `unreachable`), or Redis is unreachable with "
            "SDB_REDIS_FAILURE_MODE=closed."
        }
    },
)
async def readyz(state: StateDep) -> Response:
    """`status` is `ready`, `not ready` (503), or `degraded` (200): Redis is unreachable, and with
    SDB_REDIS_FAILURE_MODE=open /predict counts its rate limit in each process until it is back."""
    ready, body = await readiness(state)
    return FastJSONResponse(body, status_code=200 if ready else 503)


async def readiness(state: ServiceState) -> tuple[bool, dict[str, Any]]:
    """(ready, the /readyz body): models loaded, database reachable, Redis unless it may fail open."""
    models = state.models.names()
    database, redis = await asyncio.gather(_database_state(state.db), _redis_state(state.redis))
    redis_down = redis == "unreachable"
    redis_blocks = redis_down and state.settings.redis_failure_mode == "closed"
    ready = bool(models) and database == "ok" and not redis_blocks
    body = {
        "status": ("degraded" if redis_down else "ready") if ready else "not ready",
        "models": models,
        "database": database,
        "redis": redis,
    }
    return ready, body


# Its own router, included only with SDB_EXPOSE_METRICS (create_app): off, /metrics is a 404 that the
# OpenAPI schema does not list either.
metrics_router = APIRouter(tags=["health"])


@metrics_router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus_metrics(state: StateDep) -> Response:
    if not state.settings.expose_metrics:
        return FastJSONResponse({"detail": "Not Found"}, status_code=404)
    data, content_type = await asyncio.to_thread(render_metrics)
    data += await render_database_metrics(state.db)
    data += await render_redis_metrics(state.redis)
    return Response(content=data, media_type=content_type)
