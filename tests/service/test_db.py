"""Database layer on SQLite and PostgreSQL: connection settings, UTC times, key lookup, and the background
/predict audit writer (never blocks, keeps rows while the database is down, flushes at shutdown).
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from service.core.security import new_api_key
from service.crud import accounts
from service.db.aggregates import AggregateConfig, AggregateWriter
from service.db.audit_queue import AuditQueue, AuditQueueConfig, AuditRecord
from service.db.models import ROLE_USER, QueryAudit, User, utcnow
from service.db.session import Database, normalize_url
from tests._support.db import audit_rows


@pytest.fixture
def db(database_url: str) -> Any:
    d = Database(database_url)
    yield d
    d.dispose()


def test_plain_postgresql_urls_use_psycopg3() -> None:
    assert normalize_url("postgresql://u@h/db").startswith("postgresql+psycopg://")
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
@pytest.mark.parametrize("kind", ["session", "connection"])
def test_sqlite_runs_in_wal_with_a_busy_timeout_and_immediate_writes(db: Database, kind: str) -> None:
    write = db.write if kind == "session" else db.write_connection
    with db.session() as s:
        assert s.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
        assert int(s.execute(text("PRAGMA busy_timeout")).scalar_one()) >= 5000
        assert int(s.execute(text("PRAGMA foreign_keys")).scalar_one()) == 1
    # a write transaction holds the write lock from its first statement: a second writer waits, then runs
    order: list[str] = []
    entered = threading.Event()

    def first() -> None:
        with write() as s:
            s.execute(text("SELECT 1"))
            entered.set()
            time.sleep(0.3)
            order.append("first")

    t = threading.Thread(target=first)
    t.start()
    entered.wait(5)
    with write() as s:
        s.execute(text("SELECT 1"))
        order.append("second")
    t.join()
    assert order == ["first", "second"]


def test_times_are_utc_aware_on_every_backend(db: Database) -> None:
    with db.write() as s:
        user = accounts.create_user(s, "tz", ROLE_USER)
        uid = user.id
    with db.session() as s:
        created = s.get(User, uid).created_at  # type: ignore[union-attr]
    assert created.tzinfo is not None and created.utcoffset() == UTC.utcoffset(None)
    assert abs((datetime.now(UTC) - created).total_seconds()) < 60
    with pytest.raises(Exception, match="naive"), db.write() as s:
        s.add(QueryAudit(endpoint="/predict", status=200, created_at=datetime.now()))
        s.flush()


def test_find_key_by_secret(db: Database) -> None:
    with db.write() as s:
        user = accounts.create_user(s, "k", ROLE_USER)
        keys = [new_api_key() for _ in range(3)]
        for k in keys:
            accounts.create_api_key(
                s, user, prefix=k.prefix, digest=k.digest, scopes=["a"], sample_quota=None, expires_at=None
            )
    with db.session() as s:
        for k in keys:
            found = accounts.find_key_by_secret(s, k.secret)
            assert found is not None and found.key_hash == k.digest
        assert accounts.find_key_by_secret(s, keys[0].secret[:-1] + "!") is None
        assert accounts.find_key_by_secret(s, "short") is None


def _record(i: int) -> AuditRecord:
    return AuditRecord(
        endpoint="/predict",
        model="alpha",
        client_id=f"anon-{i % 3}",
        n_samples=1,
        status=200,
        latency_ms=1.0,
        input_digest=None,
        created_at=utcnow(),
    )


def rows_on() -> AggregateWriter:
    """A writer that keeps every /predict row (these tests read them back)."""
    return AggregateWriter(AggregateConfig(rows="on"))


def test_audit_queue_writes_in_the_background_and_flushes_on_close(db: Database, database_url: str) -> None:
    q = AuditQueue(db, AuditQueueConfig(interval_s=0.05, batch_size=50), writer=rows_on())
    q.start()
    for i in range(120):
        q.submit(_record(i))
    assert q.flush(timeout=10)
    assert len(audit_rows(database_url)) == 120
    q.close()
    # rows submitted just before close are not lost
    q2 = AuditQueue(db, AuditQueueConfig(interval_s=30), writer=rows_on())
    q2.start()
    for i in range(40):
        q2.submit(_record(i))
    q2.close()
    assert len(audit_rows(database_url)) == 160


def test_audit_queue_keeps_rows_while_the_database_is_down(db: Database, database_url: str) -> None:
    q = AuditQueue(db, AuditQueueConfig(interval_s=0.02, retry_s=0.05), writer=rows_on())
    broken = threading.Event()
    broken.set()
    real_write = q._write

    def flaky(batch: list[AuditRecord], token: str) -> None:
        if broken.is_set():
            raise OperationalError("INSERT", {}, Exception("database is down"))
        real_write(batch, token)

    q._write = flaky  # type: ignore[method-assign]
    q.start()
    t0 = time.perf_counter()
    for i in range(25):
        q.submit(_record(i))
    assert time.perf_counter() - t0 < 1.0  # submit never waits for the database
    time.sleep(0.3)
    assert q.pending == 25 and len(audit_rows(database_url)) == 0
    broken.clear()
    assert q.flush(timeout=10)
    assert len(audit_rows(database_url)) == 25
    q.close()


def test_audit_queue_bounds_memory_and_counts_drops(db: Database) -> None:
    from prometheus_client import REGISTRY

    def dropped() -> float:
        return REGISTRY.get_sample_value("sdb_predict_audit_dropped_total") or 0.0

    before = dropped()
    q = AuditQueue(db, AuditQueueConfig(max_pending=5))
    for i in range(8):
        q.submit(_record(i))
    assert q.pending == 5 and dropped() - before == 3


def test_predict_audit_rows_are_written_by_shutdown(app: FastAPI, database_url: str) -> None:
    n = 30
    with TestClient(app) as client:
        app.state.sdb.audit_queue.cfg = AuditQueueConfig(interval_s=60)  # nothing written before shutdown
        for _ in range(n):
            r = client.post("/predict", json={"model": "alpha", "inputs": [[[[0.1] * 8] * 8]]})
            assert r.status_code == 200
    rows = audit_rows(database_url, "endpoint = '/predict'")
    assert len(rows) == n and all(r.status == 200 and r.client_id for r in rows)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_connection_that_lost_write_access_is_dropped_and_readiness_says_so(database_url: str) -> None:
    """A pooled SQLite connection opened while the file was not writable stays read-only for good (it
    passes a SELECT 1): the first failed write must discard it, and the readiness ping must test writes."""
    import sqlite3

    from sqlalchemy import event
    from sqlalchemy.engine import make_url

    path = make_url(database_url).database
    db = Database(database_url)
    read_only_left = [2]  # the next two connections are opened read-only, as during a write outage

    @event.listens_for(db.engine, "do_connect")
    def _read_only(dialect: Any, record: Any, cargs: Any, cparams: Any) -> Any:
        if read_only_left[0] > 0:
            read_only_left[0] -= 1
            return sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        return None

    try:
        assert db.ping() is False  # readiness reflects that writes fail
        with pytest.raises(OperationalError, match="readonly"), db.write() as s:
            accounts.create_user(s, "during-the-outage", ROLE_USER)
        # the files are writable again: the failed connections were discarded, not pooled
        with db.write() as s:
            accounts.create_user(s, "after-the-outage", ROLE_USER)
        assert db.ping() is True
    finally:
        db.dispose()
