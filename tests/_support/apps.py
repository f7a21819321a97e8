"""In-process apps for route tests: the real middleware and error handlers, a state built from test parts."""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import APIRouter, FastAPI

from service.core.config import Settings
from service.core.errors import install_error_handlers
from service.core.security import TokenConfig
from service.core.state import ServiceState, set_state
from service.db.audit_queue import AuditQueue
from service.db.session import Database
from service.inference.registry import ModelRegistry
from service.middleware import install_middleware


def route_app(
    settings: Settings,
    *routers: APIRouter,
    models: ModelRegistry,
    db: Any = None,
    audit_queue: Any = None,
) -> FastAPI:
    """An app with only `routers`, whose state holds the given parts (an in-memory SQLite database and an
    unstarted audit queue unless given)."""
    app = FastAPI()
    install_middleware(app, settings)
    install_error_handlers(app)
    for router in routers:
        app.include_router(router)
    database = db if db is not None else Database("sqlite://")
    tokens = TokenConfig(
        secret=secrets.token_urlsafe(48),  # never a value written in the repository
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        ttl_seconds=settings.token_ttl_seconds,
    )
    queue = audit_queue if audit_queue is not None else AuditQueue(database)
    set_state(app, ServiceState.build(settings, db=database, models=models, tokens=tokens, audit_queue=queue))
    return app
