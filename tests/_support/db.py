"""Database helpers for tests: migrations, and audit rows read straight from the database."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from service.db.migrate import upgrade
from service.db.session import make_engine


def run_migrations(database_url: str) -> None:
    upgrade(database_url)


def audit_rows(database_url: str, where: str = "1=1", params: dict[str, Any] | None = None) -> list[Any]:
    """Rows of query_audits read straight from the database (a separate engine), oldest first."""
    eng = make_engine(database_url)
    try:
        with eng.connect() as c:
            return list(
                c.execute(text(f"SELECT * FROM query_audits WHERE {where} ORDER BY id"), params or {})
            )
    finally:
        eng.dispose()


def count_audits(database_url: str, endpoint: str | None = None, where: str = "") -> int:
    """Rows in query_audits (optionally for one endpoint path, e.g. "/predict"), read straight from the DB."""
    q = "SELECT count(*) FROM query_audits WHERE 1=1"
    params: dict[str, Any] = {}
    if endpoint is not None:
        q += " AND endpoint = :e"
        params["e"] = endpoint
    if where:
        q += f" AND {where}"
    eng = make_engine(database_url)
    try:
        with eng.connect() as c:
            return int(c.execute(text(q), params).scalar_one())
    finally:
        eng.dispose()
