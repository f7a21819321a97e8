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
    # 0005: each watermarked key's own images
    "licensee_images",
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


def test_0002_watermarks_upgrades_and_downgrades_a_database_with_data(empty_database_url: str) -> None:
    """From revision 0001 with users, keys and audits in it: 0002 adds the watermark columns (existing keys
    unwatermarked, their rows intact), and the downgrade drops them again without losing the rows."""
    from sqlalchemy import text

    url = empty_database_url
    migrate.upgrade(url, "0001")
    db = Database(url)
    try:
        with db.write() as s:
            s.execute(
                text(
                    "INSERT INTO users (id, name, role, disabled, created_at) "
                    "VALUES (1, 'alice', 'user', false, CURRENT_TIMESTAMP)"
                )
            )
            s.execute(
                text(
                    "INSERT INTO api_keys (id, user_id, prefix, key_hash, scopes, samples_used, rate_window, "
                    "rate_count, created_at) VALUES (1, 1, 'sdb_abc', 'h1', '[]', 5, 0, 0, CURRENT_TIMESTAMP)"
                )
            )
            s.execute(
                text(
                    "INSERT INTO query_audits (created_at, endpoint, user_id, api_key_id, n_samples, status) "
                    "VALUES (CURRENT_TIMESTAMP, '/distill-batch', 1, 1, 5, 200)"
                )
            )
    finally:
        db.dispose()
    migrate.upgrade(url, "0002")
    db = Database(url)
    try:
        with db.session() as s:
            key = s.execute(
                text("SELECT samples_used, watermarked, watermark_id, watermark_slot FROM api_keys")
            ).one()
            assert tuple(key) == (5, False, None, None)
            assert s.execute(text("SELECT watermark_id, n_samples FROM query_audits")).one() == (None, 5)
        with db.write() as s:  # the slot is unique
            s.execute(
                text("UPDATE api_keys SET watermarked = true, watermark_id = 'wm-1', watermark_slot = 0")
            )
            s.execute(text("UPDATE query_audits SET watermark_id = 'wm-1'"))
    finally:
        db.dispose()
    migrate.downgrade(url, "0001")
    db = Database(url)
    try:
        with db.session() as s:
            assert s.execute(text("SELECT samples_used FROM api_keys")).scalar_one() == 5
            assert s.execute(text("SELECT count(*) FROM query_audits")).scalar_one() == 1
        assert "watermark_id" not in {c["name"] for c in inspect(db.engine).get_columns("api_keys")}
    finally:
        db.dispose()
    migrate.upgrade(url)
