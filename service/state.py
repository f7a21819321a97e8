"""The service's one typed state (`ServiceState`), built once at start-up and read through `get_state`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request

from service.clients import ClientIdentifier
from service.config import Settings
from service.db.audit_queue import AuditQueue
from service.db.session import Database
from service.extraction import ExtractionMonitor
from service.inference.registry import ModelRegistry
from service.ratelimit import RateLimiter
from service.security import TokenConfig


@dataclass(frozen=True)
class ServiceState:
    settings: Settings
    db: Database
    models: ModelRegistry
    tokens: TokenConfig
    audit_queue: AuditQueue
    client_ids: ClientIdentifier
    predict_limiter: RateLimiter
    extraction_monitor: ExtractionMonitor

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        db: Database,
        models: ModelRegistry,
        tokens: TokenConfig,
        audit_queue: AuditQueue,
    ) -> ServiceState:
        """The state of one process; the limiter, the monitor and the client ids come from settings."""
        return cls(
            settings=settings,
            db=db,
            models=models,
            tokens=tokens,
            audit_queue=audit_queue,
            client_ids=ClientIdentifier.from_settings(settings),
            predict_limiter=RateLimiter(settings.predict_rate_per_minute),
            extraction_monitor=ExtractionMonitor(
                settings.extraction_window_s, settings.extraction_sample_threshold
            ),
        )


def set_state(app: FastAPI, state: ServiceState) -> None:
    app.state.sdb = state


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.sdb
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]
