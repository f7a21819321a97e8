"""The service's one typed state (`ServiceState`), built once at start-up and read through `get_state`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request

from service.core.config import Settings
from service.core.security import TokenConfig
from service.db.audit_queue import AuditQueue
from service.db.session import Database
from service.inference.registry import ModelRegistry
from service.limits.clients import ClientIdentifier
from service.limits.extraction import ExtractionMonitor
from service.limits.ratelimit import PredictRateLimit
from service.limits.redis_backend import RedisBackend
from service.watermarks.issuer import Watermarker
from service.watermarks.samples import RANK_LABEL, LicenseeImages
from service.watermarks.secret import resolve_watermark_secret


@dataclass(frozen=True)
class ServiceState:
    settings: Settings
    db: Database
    models: ModelRegistry
    tokens: TokenConfig
    audit_queue: AuditQueue
    client_ids: ClientIdentifier
    predict_limiter: PredictRateLimit
    extraction_monitor: ExtractionMonitor
    redis: RedisBackend | None  # SDB_REDIS_URL: the limiter's and the monitor's shared counters
    watermarks: Watermarker  # the per-API-key marks of /distill-batch (service/watermarks)
    licensee_images: LicenseeImages  # each watermarked key's own images, that a trace probes with

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        db: Database,
        models: ModelRegistry,
        tokens: TokenConfig,
        audit_queue: AuditQueue,
        watermarks: Watermarker | None = None,
    ) -> ServiceState:
        """The state of one process; the limiter, the monitor and the client ids come from settings.

        The Redis client connects on first use, from this process's event loop."""
        redis = None
        if settings.redis_url is not None:
            redis = RedisBackend(
                settings.redis_url.get_secret_value(),
                prefix=settings.redis_key_prefix,
                timeout_s=settings.redis_timeout_s,
                retry_s=settings.redis_retry_s,
            )
        watermarks = watermarks or Watermarker(
            resolve_watermark_secret(settings, tokens.secret, warn=False), settings.watermark_disabled_models
        )
        return cls(
            settings=settings,
            db=db,
            models=models,
            tokens=tokens,
            audit_queue=audit_queue,
            client_ids=ClientIdentifier.from_settings(settings),
            predict_limiter=PredictRateLimit(
                settings.predict_rate_per_minute, redis, fail_closed=settings.redis_failure_mode == "closed"
            ),
            extraction_monitor=ExtractionMonitor(
                settings.extraction_window_s, settings.extraction_sample_threshold, redis=redis
            ),
            redis=redis,
            watermarks=watermarks,
            licensee_images=LicenseeImages(db, watermarks.derived_key(RANK_LABEL), settings.licensee_images),
        )


def set_state(app: FastAPI, state: ServiceState) -> None:
    app.state.sdb = state


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.sdb
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]
