"""Engine and session handling for SQLite and PostgreSQL.

SQLite: WAL journal, a busy timeout and `BEGIN IMMEDIATE` for write transactions (a deferred transaction
that later upgrades to a write lock ignores the busy timeout and fails at once with "database is locked");
a connection that fails a write as read-only is dropped.
Readiness (`probe`) commits a real write on both backends (a no-op UPDATE of `alembic_version`) and, on
SQLite, also wants `sqlite_min_free_bytes` free on the database's file system: a full disk is reported as
such even while SQLite can still reuse the space of its write-ahead log.
PostgreSQL: psycopg 3, `pool_pre_ping` so that the pool recovers by itself after the server comes back, and
short connect/pool timeouts so that a dead database answers fast instead of hanging.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker


@dataclass(frozen=True)
class DatabaseConfig:
    sqlite_busy_timeout_ms: int = 15_000
    pg_connect_timeout_s: int = 3
    pg_statement_timeout_ms: int = 15_000
    pool_size: int = 10
    max_overflow: int = 20
    pool_timeout_s: float = 5.0
    sqlite_min_free_bytes: int = 1024 * 1024  # /readyz: below this on the SQLite file's file system, "full"


WRITE = {"sdb_write": True}  # Session.connection(execution_options=WRITE) -> BEGIN IMMEDIATE on SQLite


def normalize_url(url: str) -> str:
    """Use the psycopg 3 driver for plain `postgresql://` URLs."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def make_engine(url: str, config: DatabaseConfig | None = None) -> Engine:
    cfg = config or DatabaseConfig()
    url = normalize_url(url)
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:" and not u.database.startswith("file:"):
            Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": cfg.sqlite_busy_timeout_ms / 1000},
            pool_pre_ping=True,
        )
        _configure_sqlite(engine, cfg)
        return engine
    connect_args: dict[str, Any] = {
        "connect_timeout": cfg.pg_connect_timeout_s,
        "options": f"-c statement_timeout={cfg.pg_statement_timeout_ms}",
    }
    return create_engine(
        url,
        connect_args=connect_args,
        pool_pre_ping=True,
        pool_size=cfg.pool_size,
        max_overflow=cfg.max_overflow,
        pool_timeout=cfg.pool_timeout_s,
    )


def _configure_sqlite(engine: Engine, cfg: DatabaseConfig) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module so that BEGIN is ours (see "begin" below).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(cfg.sqlite_busy_timeout_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        write = conn.get_execution_options().get("sdb_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    @event.listens_for(engine, "handle_error")
    def _read_only_is_dead(context: Any) -> None:
        # A connection opened while the file was not writable stays read-only after the file is writable
        # again, and it passes the SELECT 1 pre-ping: treat it as disconnected so that the pool drops it.
        if "readonly database" in str(context.original_exception):
            context.is_disconnect = True


class Database:
    """The engine and session factory of one process (`ServiceState.db`)."""

    def __init__(self, url: str, config: DatabaseConfig | None = None) -> None:
        self.url = normalize_url(url)
        self.config = config or DatabaseConfig()
        self.engine = make_engine(self.url, self.config)
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessionmaker() as s:
            yield s

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session whose transaction is a write transaction from its first statement, committed on exit."""
        with self.sessionmaker() as s:
            s.connection(execution_options=WRITE)
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    @contextmanager
    def write_connection(self) -> Iterator[Connection]:
        """A Core connection in a write transaction (BEGIN IMMEDIATE on SQLite), committed on exit."""
        with self.engine.connect() as conn:
            conn.execution_options(**WRITE)
            with conn.begin():
                yield conn

    def probe(self) -> str:
        """What readiness reports: "ok" when a write commits; "full" (no space left; on SQLite, also less
        than `sqlite_min_free_bytes` free on the file's file system), "read-only", or "unreachable"."""
        try:
            path = make_url(self.url).database if self.engine.dialect.name == "sqlite" else None
            if path and path != ":memory:" and not path.startswith("file:"):
                free = shutil.disk_usage(Path(path).expanduser().absolute().parent).free
                if free < self.config.sqlite_min_free_bytes:
                    return "full"
            with self.engine.connect() as c:
                c.execution_options(**WRITE)
                with c.begin():  # committed: a rolled-back write never reaches the disk
                    c.exec_driver_sql("UPDATE alembic_version SET version_num = version_num")
            return "ok"
        except Exception as exc:
            text = str(exc).lower()
            if "disk is full" in text or "no space left" in text:
                return "full"
            if "readonly" in text or "read-only" in text:
                return "read-only"
            return "unreachable"

    def ping(self) -> bool:
        """Whether the database answers and takes a write (`probe` says why not)."""
        return self.probe() == "ok"

    def dispose(self) -> None:
        self.engine.dispose()
