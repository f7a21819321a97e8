"""PostgreSQL for tests: the server's availability, fresh databases (optionally from a template), URLs."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

from sqlalchemy.engine import make_url

PG_ADMIN_URL = os.environ.get("SDB_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")

_available: bool | None = None


def pg_available() -> bool:
    """Whether a server answers at PG_ADMIN_URL (asked once per process)."""
    global _available
    if _available is None:
        import psycopg

        try:
            with psycopg.connect(PG_ADMIN_URL, connect_timeout=3) as c:
                c.execute("SELECT 1")
            _available = True
        except psycopg.Error:
            _available = False
    return _available


def pg_parts() -> tuple[str, int]:
    """Host and port of the PostgreSQL server."""
    u = make_url(PG_ADMIN_URL)
    return u.host or "127.0.0.1", u.port or 5432


def pg_url(dbname: str, port: int | None = None) -> str:
    """The SQLAlchemy URL (psycopg 3) of database `dbname`, optionally through another port (a proxy)."""
    u = make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=dbname)
    if port is not None:
        u = u.set(port=port)
    return u.render_as_string(hide_password=False)


def _admin_exec(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as c:
        c.execute(sql)


def create_pg_database(template: str | None = None, prefix: str = "sdb_t") -> str:
    """A new database (a copy of `template` if given); returns its name."""
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    _admin_exec(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    return name


def drop_pg_database(name: str) -> None:
    _admin_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def pg_database(prefix: str = "sdb_t", template: str | None = None) -> Iterator[str]:
    """A fresh database for the `with` block; yields its name and drops it afterwards."""
    name = create_pg_database(template, prefix)
    try:
        yield name
    finally:
        drop_pg_database(name)
