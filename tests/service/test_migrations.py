"""Alembic on empty SQLite and PostgreSQL databases: upgrade head, downgrade base, upgrade head; the
models match the migrations; the service refuses to start on an out-of-date schema and names the command.
"""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import inspect

from service.db import migrate
from service.db.models import Base
from service.db.session import Database

TABLES = {
    "users",
    "api_keys",
    "query_audits",
    "models",
    "security_events",
    # 0003: the audit aggregates
    "audit_clients",
    "usage_minutes",
    "client_usage",
    "client_days",
    "user_usage",
    "audit_rollups",
    "audit_flushes",
}


def tables(url: str) -> set[str]:
    db = Database(url)
    try:
        return set(inspect(db.engine).get_table_names()) - {"alembic_version"}
    finally:
        db.dispose()


def test_upgrade_downgrade_upgrade_on_an_empty_database(empty_database_url: str) -> None:
    assert tables(empty_database_url) == set()
    migrate.upgrade(empty_database_url)
    assert tables(empty_database_url) == TABLES
    migrate.downgrade(empty_database_url, "base")
    assert tables(empty_database_url) == set()
    migrate.upgrade(empty_database_url)
    assert tables(empty_database_url) == TABLES
    db = Database(empty_database_url)
    try:
        migrate.check_schema(db.engine)
        assert migrate.current_revision(db.engine) == migrate.head_revision()
    finally:
        db.dispose()


def test_models_match_the_migrations(database_url: str) -> None:
    db = Database(database_url)
    try:
        with db.engine.connect() as conn:
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
            )
    finally:
        db.dispose()
    assert diff == []


def _start(make_settings: Any, url: str, **over: Any) -> None:
    from service.main import create_app

    with TestClient(create_app(make_settings(database_url=url, **over))):
        pass


def test_refuses_to_start_on_an_empty_or_old_schema(make_settings: Any, empty_database_url: str) -> None:
    with pytest.raises(migrate.SchemaError, match=r"sdb db upgrade"):
        _start(make_settings, empty_database_url)
    assert tables(empty_database_url) == set()  # nothing was created behind the operator's back
    migrate.upgrade(empty_database_url)
    migrate.downgrade(empty_database_url, "base")
    with pytest.raises(migrate.SchemaError, match=r"no schema.*sdb db upgrade"):
        _start(make_settings, empty_database_url)


def test_refuses_to_start_on_an_unknown_revision(make_settings: Any, database_url: str) -> None:
    from sqlalchemy import text

    db = Database(database_url)
    try:
        with db.write() as s:
            s.execute(text("UPDATE alembic_version SET version_num = 'feedbeef'"))
    finally:
        db.dispose()
    with pytest.raises(migrate.SchemaError, match=r"revision feedbeef.*sdb db upgrade"):
        _start(make_settings, database_url)


def test_demo_mode_migrates_by_itself(make_settings: Any, empty_database_url: str) -> None:
    _start(make_settings, empty_database_url, demo=True, jwt_secret=None)
    assert tables(empty_database_url) == TABLES
