"""The FastAPI application: `create_app(settings)` and its lifespan, which builds the `ServiceState`.

Run it with `sdb serve`, or `uvicorn service.main:create_app --factory --no-proxy-headers` (settings from
SDB_* variables; without --no-proxy-headers uvicorn itself trusts X-Forwarded-For from 127.0.0.1).
Start-up: JWT secret (random in demo mode only) -> database engine -> schema revision check (refuses to
start on an out-of-date schema; demo mode migrates by itself) -> first admin from SDB_BOOTSTRAP_ADMIN_TOKEN
-> models -> /predict audit writer. Shutdown (after uvicorn finished the in-flight requests): models, then
the audit writer is flushed, then the engine is disposed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import anyio
from fastapi import FastAPI
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from service.core.config import Settings, get_settings
from service.core.errors import install_error_handlers
from service.core.security import TokenConfig, api_key_from_secret
from service.core.state import ServiceState, set_state
from service.crud import accounts, catalog, quota, rollup
from service.crud import watermarks as crud_watermarks
from service.db import migrate
from service.db.aggregates import AggregateConfig, AggregateWriter
from service.db.audit_queue import AuditQueue
from service.db.session import Database
from service.docs import install_docs
from service.inference.loading import ModelLoadError, load_registry
from service.inference.registry import ModelRegistry
from service.middleware import install_middleware
from service.observability.gc_tuning import observe_gc_pauses, release_gc, tune_gc
from service.oip.errors import install_error_shape
from service.routes import auth, console, distill, health, key_info, oip, predict, trace
from service.routes.admin import accounts as admin_accounts
from service.routes.admin import reports as admin_reports
from service.watermarks.issuer import Watermarker
from service.watermarks.secret import WatermarkSecretError, resolve_watermark_secret

logger = logging.getLogger(__name__)

BOOTSTRAP_ADMIN_NAME = "admin"
DESCRIPTION = """
Serve a boxed classifier to everyone, and let only licensed users distill it.

* `POST /predict` — anyone, no token: the plain path's class probabilities.
* `POST /auth/token` — exchange an API key for a short-lived access token (JWT).
* `POST /distill-batch` — `Authorization: Bearer <token>`: the keyed path's soft labels and logits.
* `/v2/*` — the Open Inference Protocol (KServe v2 / Triton REST): anyone gets the plain outputs,
  a bearer token with the model in scope the keyed outputs (`soft_labels`, `logits`).
* `/admin/*` — administrators: users, API keys, audits, usage, extraction watch, models.
"""


class _DropQueryString(logging.Filter):
    """uvicorn's access log prints the full path; a token put in a query string must not reach it."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
        return True


def _configure_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("service").setLevel(level.upper())
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _DropQueryString) for f in access.filters):
        access.addFilter(_DropQueryString())


def _token_config(settings: Settings) -> TokenConfig:
    if settings.jwt_secret is not None:
        secret = settings.jwt_secret.get_secret_value()
    else:  # demo mode only (Settings refuses a missing secret otherwise); tokens die with the process
        secret = secrets.token_urlsafe(48)
        logger.warning("demo mode: using a random JWT secret; tokens stop working when the server restarts")
    return TokenConfig(
        secret=secret,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        ttl_seconds=settings.token_ttl_seconds,
    )


def bootstrap_admin_from_env(db: Database, secret: str) -> bool:
    """Create the first admin with the operator-chosen API key, unless an admin exists. True if created."""
    key = api_key_from_secret(secret)
    try:
        with db.write() as s:
            accounts.create_first_admin(s, BOOTSTRAP_ADMIN_NAME, key, via="env")
    except (IntegrityError, accounts.ConflictError):
        return False  # an admin exists (another worker created it first), or a user named "admin" exists
    logger.info("created the first administrator from SDB_BOOTSTRAP_ADMIN_TOKEN")
    return True


def _start(settings: Settings, registry: ModelRegistry | None) -> ServiceState:
    """Everything that needs I/O: database and schema check, first admin, models, the audit writer."""
    db = Database(settings.database_url)
    try:
        if settings.demo:
            migrate.upgrade(db.url)
        migrate.check_schema(db.engine)
        if settings.bootstrap_admin_token is not None:
            bootstrap_admin_from_env(db, settings.bootstrap_admin_token.get_secret_value())
        models = registry if registry is not None else load_registry(settings)
        infos = [m.info() for m in models]
        for attempt in range(3):  # workers starting together may insert the same model row: retry
            try:
                with db.write() as s:
                    catalog.sync_models(s, infos)
                break
            except IntegrityError:
                if attempt == 2:
                    raise
    except BaseException:
        db.dispose()
        raise
    tokens = _token_config(settings)
    try:
        marks = _watermarker(settings, db, tokens.secret)
    except BaseException:
        db.dispose()
        raise
    writer = AggregateWriter(
        AggregateConfig(
            window_min=settings.extraction_window_s // 60,
            rows=settings.predict_audit_rows,
            sample_rate=settings.predict_audit_sample_rate,
        )
    )
    queue = AuditQueue(db, writer=writer, maintenance=lambda: rollup.maintain(db))
    queue.start()
    return ServiceState.build(
        settings, db=db, models=models, tokens=tokens, audit_queue=queue, watermarks=marks
    )


CHECKED_WATERMARKS = 1000  # the newest keys whose stored watermark id is checked against the secret at start


def _watermarker(settings: Settings, db: Database, jwt_secret: str) -> Watermarker:
    """The process's watermarks; refuses to start (outside demo mode) on a secret that does not give the
    watermark ids stored on the keys: serving new marks under another secret would leave every student
    distilled so far untraceable, silently."""
    marks = Watermarker(resolve_watermark_secret(settings, jwt_secret), settings.watermark_disabled_models)
    with db.session() as s:
        issued = crud_watermarks.issued_watermarks(s, limit=CHECKED_WATERMARKS)
    bad = marks.mismatched((w.key_id, w.prefix, w.watermark_id) for w in issued)
    if bad:
        message = (
            f"{len(bad)} of the {len(issued)} newest watermarked API keys were issued under another "
            "watermark secret: set SDB_WATERMARK_SECRET (or SDB_WATERMARK_SECRET_FILE, or the SDB_JWT_SECRET "
            "it was derived from) to the secret they were issued under (docs/operations.md#watermark-secret)"
        )
        if not settings.demo:
            raise WatermarkSecretError(message)
        logger.warning("demo mode: %s; their soft labels now carry marks a trace will not find", message)
    return marks


SWEEP_INTERVAL_S = 60.0


def _stale_after_s(settings: Settings) -> float:
    # Well past any live call: the inference deadline plus time for both transactions.
    return 2 * settings.inference_timeout_s + 60.0


async def _sweep_reservations(db: Database, settings: Settings) -> None:
    """Give back the samples of reservations never confirmed (the database failed at the confirm)."""
    while True:
        try:
            await anyio.to_thread.run_sync(quota.release_stale_reservations, db, _stale_after_s(settings))
        except (OperationalError, InterfaceError, PoolTimeoutError) as exc:
            logger.info("reservation sweep skipped, database unavailable: %s", type(exc).__name__)
        await anyio.sleep(SWEEP_INTERVAL_S)


def _lifespan(
    settings: Settings, registry: ModelRegistry | None
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            state = await anyio.to_thread.run_sync(_start, settings, registry)
        except (migrate.SchemaError, ModelLoadError, WatermarkSecretError) as exc:
            logger.error("refusing to start: %s", exc)
            raise
        set_state(app, state)
        gc_before = tune_gc(settings.gc_freeze, settings.gc_gen0_threshold)
        observe_gc_pauses()
        sweeper = asyncio.create_task(_sweep_reservations(state.db, settings))
        flusher = asyncio.create_task(state.extraction_monitor.run()) if state.redis is not None else None
        try:
            yield
        finally:
            sweeper.cancel()
            if flusher is not None:
                flusher.cancel()
            with anyio.CancelScope(shield=True):
                await state.models.aclose()
                if state.redis is not None:
                    await state.extraction_monitor.flush()
                    await state.redis.aclose()
                await anyio.to_thread.run_sync(state.audit_queue.close)
                state.db.dispose()
                release_gc(gc_before)

    return lifespan


def create_app(settings: Settings | None = None, *, registry: ModelRegistry | None = None) -> FastAPI:
    """Build the application. `registry` replaces loading models from SDB_MODEL_DIR (tests)."""
    settings = settings or get_settings()
    _configure_logging(settings.log_level)
    app = FastAPI(
        title="Safe Distillation Box",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=_lifespan(settings, registry),
        docs_url=None,  # service/docs.py serves /docs without a CDN
    )
    install_docs(app)
    install_middleware(app, settings)
    install_error_handlers(app)
    install_error_shape(app)  # {"error": ...} under /v2, the Open Inference Protocol's shape
    app.include_router(health.router)
    if settings.expose_metrics:
        app.include_router(health.metrics_router)
    app.include_router(predict.router)
    app.include_router(oip.router)  # early: the hot infer route is matched after few others
    app.include_router(auth.router)
    app.include_router(key_info.router)
    app.include_router(distill.router)
    app.include_router(admin_accounts.router)
    app.include_router(admin_reports.router)
    app.include_router(trace.router)
    if settings.console:
        app.include_router(console.router)
    return app
