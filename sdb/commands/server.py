"""Service commands: `sdb serve`, `sdb admin bootstrap`, `sdb db upgrade|downgrade|current|prune`.

Settings come from SDB_* environment variables (service.core.config.Settings); the options below only set the
matching variables for this run. `sdb db` and `sdb admin` need only the database URL, not the JWT secret.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import tempfile
from types import FrameType
from typing import Annotated, Any

import typer

DATABASE_URL_HELP = "Database URL (default: SDB_DATABASE_URL, else the settings' default SQLite file)."


def resolve_database_url(option: str | None) -> str:
    if option:
        return option
    env = os.environ.get("SDB_DATABASE_URL")
    if env:
        return env
    from service.core.config import Settings

    default = Settings.model_fields["database_url"].default
    return str(default)


def _require_writable(url: str) -> None:
    """One line and exit 1 when this process cannot write the SQLite database (no traceback from SQLite)."""
    from service.db.preflight import sqlite_write_problem

    problem = sqlite_write_problem(url)
    if problem is not None:
        typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(1)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def serve(
    host: Annotated[str | None, typer.Option(help="Sets SDB_HOST (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Sets SDB_PORT (default 8000).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes (each loads its own models).")] = 1,
    graceful_timeout: Annotated[
        int, typer.Option(min=0, help="Seconds to finish in-flight requests after SIGTERM.")
    ] = 30,
    worker_healthcheck_timeout: Annotated[
        int,
        typer.Option(
            min=1,
            help="With --workers > 1: seconds a worker may leave the supervisor's health check unanswered "
            "before it is replaced (a starting worker imports torch first; uvicorn's own 5 s killed "
            "starting workers over and over on a busy 2-core machine).",
        ),
    ] = 60,
    access_log: Annotated[
        bool, typer.Option(help="Log one line per request (uvicorn's access log, at INFO).")
    ] = True,
    demo: Annotated[
        bool, typer.Option("--demo", help="Demo mode: random JWT secret, schema migrated at start.")
    ] = False,
    model_dir: Annotated[str | None, typer.Option(help="Sets SDB_MODEL_DIR.")] = None,
    database_url: Annotated[str | None, typer.Option(help="Sets SDB_DATABASE_URL.")] = None,
) -> None:
    """Run the HTTP service with uvicorn (graceful shutdown on SIGTERM).

    Every setting is an SDB_* environment variable (the README's configuration table, e.g. SDB_PORT,
    SDB_DATABASE_URL, SDB_JWT_SECRET); the options below set the matching variables for this run.
    """
    import uvicorn
    from pydantic import ValidationError

    from service.core.config import Settings

    if demo:
        os.environ["SDB_DEMO"] = "1"
    if model_dir is not None:
        os.environ["SDB_MODEL_DIR"] = model_dir
    if database_url is not None:
        os.environ["SDB_DATABASE_URL"] = database_url
    if host is not None:
        os.environ["SDB_HOST"] = host
    if port is not None:
        os.environ["SDB_PORT"] = str(port)
    try:
        settings = Settings()
    except ValidationError as exc:
        messages = "; ".join(str(e.get("msg", "")) for e in exc.errors(include_input=False))
        typer.echo(f"error: invalid settings: {messages}", err=True)
        raise typer.Exit(2) from None
    _require_writable(settings.database_url)
    from service.inference.loading import ModelLoadError, preflight

    try:  # a sealed artifact that cannot be opened: one line here rather than a traceback per worker
        preflight(settings)
    except ModelLoadError as exc:
        typer.echo(f"error: refusing to start: {exc}", err=True)
        raise typer.Exit(1) from None
    if settings.demo:
        # Migrate once here rather than in every worker at the same time.
        from service.db.migrate import upgrade

        upgrade(settings.database_url)
    if settings.jwt_secret is None:
        # Demo mode: one random secret shared by all workers of this run (never printed).
        os.environ["SDB_JWT_SECRET"] = secrets.token_urlsafe(48)
    if workers > 1 and settings.redis_url is None and settings.predict_rate_per_minute > 0:
        typer.echo(
            f"note: without SDB_REDIS_URL each of the {workers} workers counts the /predict rate limit "
            f"alone: a client can make {workers} x {settings.predict_rate_per_minute} requests a minute",
            err=True,
        )
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Without a shared directory each worker counts alone and /metrics shows one worker's share.
        metrics_dir = tempfile.mkdtemp(prefix="sdb-metrics-")
        atexit.register(shutil.rmtree, metrics_dir, ignore_errors=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal; ending with exit status 0 instead
    # of 143 tells process managers that the shutdown was clean.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    uvicorn.run(
        "service.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=workers,
        timeout_graceful_shutdown=graceful_timeout,
        timeout_worker_healthcheck=worker_healthcheck_timeout,
        access_log=access_log,
        log_level=settings.log_level.lower(),
        proxy_headers=False,  # client addresses come from SDB_TRUSTED_PROXIES only
        server_header=False,
    )


admin_app = typer.Typer(help="Administration from the command line.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)


@admin_app.command("bootstrap")
def bootstrap(
    name: Annotated[str, typer.Option(help="User name of the first administrator.")] = "admin",
    database_url: Annotated[str | None, typer.Option(help=DATABASE_URL_HELP)] = None,
) -> None:
    """Create the first administrator and print its API key once (there is no default password)."""
    from sqlalchemy.engine import make_url

    from service.core.security import new_api_key
    from service.crud import accounts
    from service.db.migrate import SchemaError, check_schema
    from service.db.session import Database

    _require_writable(resolve_database_url(database_url))
    db = Database(resolve_database_url(database_url))
    try:
        check_schema(db.engine)
        key = new_api_key()
        with db.write() as s:
            user, created = accounts.create_first_admin(s, name, key, via="cli")
    except SchemaError as exc:
        url = make_url(db.url).render_as_string(hide_password=True)
        typer.echo(f"error: {exc} (database used: {url}; set SDB_DATABASE_URL or --database-url)", err=True)
        raise typer.Exit(1) from None
    except accounts.ConflictError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        db.dispose()
    typer.echo(f"Created administrator {name!r} (user id {user.id}, key id {created.id}).", err=True)
    typer.echo("Its API key is printed below ONCE; store it now (only its hash is kept):", err=True)
    typer.echo(key.secret)


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
    database_url: Annotated[str | None, typer.Option(help=DATABASE_URL_HELP)] = None,
) -> None:
    """Apply the migrations (alembic upgrade head)."""
    from service.db.migrate import upgrade

    _require_writable(resolve_database_url(database_url))
    upgrade(resolve_database_url(database_url), revision)
    typer.echo(f"database upgraded to {revision}")


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision (`base` drops every table).")],
    database_url: Annotated[str | None, typer.Option(help=DATABASE_URL_HELP)] = None,
) -> None:
    """Revert migrations (alembic downgrade REVISION)."""
    from service.db.migrate import downgrade

    _require_writable(resolve_database_url(database_url))
    downgrade(resolve_database_url(database_url), revision)
    typer.echo(f"database downgraded to {revision}")


@db_app.command("current")
def db_current(database_url: Annotated[str | None, typer.Option(help=DATABASE_URL_HELP)] = None) -> None:
    """Print the database's revision and the code's head revision."""
    from service.db.migrate import current_revision, head_revision
    from service.db.session import Database

    db = Database(resolve_database_url(database_url))
    try:
        current = current_revision(db.engine)
    finally:
        db.dispose()
    head = head_revision()
    typer.echo(
        f"current: {current or '(empty)'}  head: {head}  {'up to date' if current == head else 'OUTDATED'}"
    )


def _days(name: str, help_: str) -> Any:
    return typer.Option(min=0.001, help=f"{help_} (default: SDB_{name.upper()}, else the settings' default).")


@db_app.command("prune")
def db_prune(
    predict_rows_days: Annotated[
        float | None, _days("retain_predict_rows_days", "Age in days past which per-request /predict rows go")
    ] = None,
    distill_rows_days: Annotated[
        float | None, _days("retain_distill_rows_days", "Age past which per-call /distill-batch rows go")
    ] = None,
    aggregates_days: Annotated[
        float | None, _days("retain_aggregates_days", "Age past which usage aggregates go")
    ] = None,
    client_windows_days: Annotated[
        float | None,
        _days("retain_client_windows_days", "Age past which per-client, per-window /predict aggregates go"),
    ] = None,
    events_days: Annotated[
        float | None, _days("retain_events_days", "Age past which security events go")
    ] = None,
    batch: Annotated[int, typer.Option(min=1, help="Rows deleted per transaction.")] = 5_000,
    pause: Annotated[float, typer.Option(min=0, help="Seconds to wait between two batches.")] = 0.0,
    database_url: Annotated[str | None, typer.Option(help=DATABASE_URL_HELP)] = None,
) -> None:
    """Delete audit rows, aggregates and security events past their retention ages (safe while serving,
    idempotent; docs/operations.md). Prints what went, as JSON."""
    import json

    from service.core.config import Settings
    from service.crud.retention import RetentionPolicy, prune
    from service.db.migrate import SchemaError, check_schema
    from service.db.session import Database

    fields = Settings.model_fields

    def age(value: float | None, name: str) -> float:
        if value is not None:
            return value
        env = os.environ.get(f"SDB_{name.upper()}")
        return float(env) if env else float(fields[name].default)

    policy = RetentionPolicy(
        predict_rows_days=age(predict_rows_days, "retain_predict_rows_days"),
        distill_rows_days=age(distill_rows_days, "retain_distill_rows_days"),
        aggregates_days=age(aggregates_days, "retain_aggregates_days"),
        events_days=age(events_days, "retain_events_days"),
        client_windows_days=age(client_windows_days, "retain_client_windows_days"),
        batch=batch,
        pause_s=pause,
    )
    db = Database(resolve_database_url(database_url))
    try:
        check_schema(db.engine)
        deleted = prune(db, policy)
    except SchemaError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        db.dispose()
    typer.echo(
        json.dumps(
            {
                "deleted": deleted,
                "policy_days": {
                    "predict_rows": policy.predict_rows_days,
                    "distill_rows": policy.distill_rows_days,
                    "aggregates": policy.aggregates_days,
                    "client_windows": policy.client_windows_days,
                    "events": policy.events_days,
                },
            }
        )
    )


def register(app: typer.Typer) -> None:
    """Add the service commands to the top-level app."""
    app.command("serve")(serve)
    from sdb.commands import admin

    admin.register(admin_app)
    app.add_typer(admin_app, name="admin")
    app.add_typer(db_app, name="db")
