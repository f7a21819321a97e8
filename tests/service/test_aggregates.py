"""The audit aggregates answer what the per-row reports answered, on the same recorded traffic.

The same synthetic traffic (seed 27: /predict calls through the audit writer, /distill-batch per-call rows
as the quota transaction writes them) is read by the reports as they were before migration 0003
(tests/service/per_row_reports.py, over per-request rows) and by the reports from the aggregates: usage,
timeline (hourly and per minute), per-client and per-user volumes (paged), and the extraction watch must
be equal, field for field, before and after the /distill-batch rollup. Also: the backfill of 0003 from
existing rows, the per-request row policies, a batch whose COMMIT answer was lost, and `sdb db prune`.
"""

from __future__ import annotations

import random
import threading
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, insert, select, update

from service.crud import reports, retention, rollup
from service.crud.audits import DISTILL_ENDPOINT, PREDICT_ENDPOINT, STATUS_RESERVED
from service.db import migrate
from service.db.aggregates import AggregateConfig, AggregateWriter, new_token
from service.db.audit_queue import AuditQueue, AuditQueueConfig, AuditRecord
from service.db.models import (
    ApiKey,
    AuditClient,
    AuditFlush,
    ClientDay,
    ClientUsage,
    QueryAudit,
    SecurityEvent,
    UsageMinute,
    User,
    UserUsage,
    utcnow,
)
from service.db.session import Database
from tests.service import per_row_reports as old

WINDOW_S = 3600
THRESHOLD = 1000


def _hour(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)


def make_users(db: Database) -> list[tuple[int, int]]:
    out = []
    with db.write() as s:
        for i in range(3):
            u = User(name=f"agg-user-{i}")
            s.add(u)
            s.flush()
            k = ApiKey(user_id=u.id, prefix=f"sdb_a{i}", key_hash=f"{i:064d}", scopes=["*"], samples_used=0)
            s.add(k)
            s.flush()
            out.append((u.id, k.id))
    return out


def _ms(at: datetime) -> datetime:
    """Whole milliseconds: SQLite's date functions round to the millisecond, the aggregates floor, so a
    time within half a millisecond of a minute would fall in different minutes in the per-row reports."""
    return at.replace(microsecond=at.microsecond // 1000 * 1000)


def traffic(
    now: datetime, users: list[tuple[int, int]], seed: int = 27
) -> tuple[list[AuditRecord], list[dict[str, Any]]]:
    """/predict records (12 clients, one heavy) and /distill-batch rows over the last 3 days."""
    rng = random.Random(seed)
    predict = []
    for _ in range(700):
        status = rng.choice([200] * 8 + [429, 422, 503])
        n = 0 if status in (429, 422) else rng.randint(1, 40)
        model = None if status in (429, 422) else rng.choice(["alpha", "beta"])
        at = _ms(now - timedelta(seconds=rng.uniform(0, 3 * 86400)))
        predict.append(
            AuditRecord(PREDICT_ENDPOINT, model, f"anon-{rng.randint(0, 11):02d}", n, status, 1.0, None, at)
        )
    heavy_at = _hour(now) - timedelta(hours=5)
    for i in range(5):  # 5 x 300 samples within one window: over THRESHOLD
        at = heavy_at + timedelta(minutes=7 * i)
        predict.append(AuditRecord(PREDICT_ENDPOINT, "alpha", "anon-heavy", 300, 200, 1.0, None, at))
    distill = []
    for i in range(160):
        status = rng.choice([200] * 6 + [429, 401, 500, 499])
        user, key = rng.choice(users)
        recent = i < 10  # within the rollup's settle time: read from the rows
        at = _ms(now - timedelta(seconds=rng.uniform(0, 30) if recent else rng.uniform(120, 3 * 86400)))
        distill.append(
            {
                "endpoint": DISTILL_ENDPOINT,
                "model": rng.choice(["alpha", "beta"]),
                "user_id": None if status == 401 else user,
                "api_key_id": None if status == 401 else key,
                "client_id": "anon-user",
                "n_samples": 0 if status in (401, 429) else rng.randint(1, 50),
                "status": status,
                "latency_ms": 2.0,
                "created_at": at,
            }
        )
    distill.sort(key=lambda r: r["created_at"])
    return predict, distill


def record(db: Database, predict: list[AuditRecord], distill: list[dict[str, Any]], rows: str = "on") -> None:
    writer = AggregateWriter(AggregateConfig(window_min=WINDOW_S // 60, rows=rows))  # type: ignore[arg-type]
    for i in range(0, len(predict), 97):
        with db.write_connection() as conn:
            writer.write(conn, predict[i : i + 97], new_token())
    if distill:
        with db.write_connection() as conn:
            conn.execute(insert(QueryAudit), distill)


def _v(rows: Any) -> list[dict[str, Any]]:
    return [vars(r) for r in rows]


def assert_same_reports(db: Database, now: datetime) -> None:
    until = _hour(now) + timedelta(hours=1)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    ranges = [
        # the clients ranking's half days (client_ranking.ranked_sums): whole days, whole half days (noon to
        # noon), parts of half days read directly or as the half minus the windows outside the range, at
        # either end, in either half
        (midnight - timedelta(days=2), midnight - timedelta(days=1)),
        (midnight - timedelta(days=1, hours=12), midnight - timedelta(hours=12)),
        (midnight - timedelta(days=2, hours=-20), midnight - timedelta(hours=20)),
        (midnight - timedelta(days=2, hours=-3), midnight - timedelta(hours=3)),
        (midnight - timedelta(days=2, hours=-9), midnight - timedelta(hours=-1)),
        (midnight - timedelta(days=1, hours=-15), midnight - timedelta(hours=5)),
        (until - timedelta(days=3, hours=1), until),
        (until - timedelta(hours=6), until - timedelta(hours=2)),  # last: the heavy client's window
    ]
    with db.session() as s:
        assert _v(reports.usage_summary(s, since=None, until=None)) == _v(
            old.usage_summary(s, since=None, until=None)
        )
        for since, end in ranges:
            assert _v(reports.usage_summary(s, since=since, until=end)) == _v(
                old.usage_summary(s, since=since, until=end)
            )
            for bucket_s in (60, 3600):
                new_t = {k: _v(v) for k, v in reports.request_timeline(s, since, end, bucket_s).items()}
                old_t = {k: _v(v) for k, v in old.request_timeline(s, since, end, bucket_s).items()}
                assert new_t == old_t
            for kind in ("anonymous", "user"):
                for bucket_s, limit, offset in ((3600, 1000, 0), (86400, 1000, 0), (3600, 4, 3)):
                    kw = dict(
                        kind=kind,
                        since=since,
                        until=end,
                        bucket_s=bucket_s,
                        window_s=WINDOW_S,
                        threshold=THRESHOLD,
                        limit=limit,
                        offset=offset,
                    )
                    new_rows, new_total = reports.client_volumes(s, **kw)  # type: ignore[arg-type]
                    old_rows, old_total = old.client_volumes(s, **kw)  # type: ignore[arg-type]
                    assert (_v(new_rows), new_total) == (_v(old_rows), old_total)
            # the extraction watch: what GET /admin/extraction computed before, and now
            before, _ = old.client_volumes(
                s,
                kind="anonymous",
                since=since,
                until=end,
                bucket_s=WINDOW_S,
                window_s=WINDOW_S,
                threshold=THRESHOLD,
                limit=10**6,
                offset=0,
            )
            now_flagged = reports.flagged_clients(
                s, since=since, until=end, window_s=WINDOW_S, threshold=THRESHOLD, limit=100
            )
            assert _v(now_flagged) == [vars(r) for r in before if r.flagged]
    assert [r for r in before if r.flagged], "the traffic has a flagged client"


def test_aggregates_answer_the_per_row_reports(database_url: str) -> None:
    db = Database(database_url)
    try:
        now = utcnow()
        predict, distill = traffic(now, make_users(db))
        record(db, predict, distill)
        assert_same_reports(db, now)  # nothing rolled up yet: /distill-batch from its rows
        # the 10 recent rows wait for the settle time (the clock pinned: a slow machine must not age them)
        assert rollup.catch_up(db, now=now) == 150
        assert rollup.catch_up(db, now=now) == 0
        assert_same_reports(db, now)
        assert rollup.catch_up(db, now=now + timedelta(minutes=5)) == 10
        assert_same_reports(db, now)
        with db.session() as s:  # every call counted once, per status
            by_status = dict(
                s.execute(
                    select(UsageMinute.status, func.sum(UsageMinute.requests)).group_by(UsageMinute.status)
                )
                .tuples()
                .all()
            )
            rows = dict(
                s.execute(select(QueryAudit.status, func.count()).group_by(QueryAudit.status)).tuples().all()
            )
        assert {k: int(v) for k, v in by_status.items()} == rows
    finally:
        db.dispose()


def test_the_migration_backfills_the_aggregates_from_existing_rows(empty_database_url: str) -> None:
    url = empty_database_url
    migrate.upgrade(url, "0002")
    db = Database(url)
    try:
        now = utcnow()
        predict, distill = traffic(now, make_users(db))
        rows = [
            {
                k: getattr(r, k)
                for k in ("endpoint", "model", "client_id", "n_samples", "status", "latency_ms", "created_at")
            }
            for r in predict
        ]
        with db.write_connection() as conn:
            conn.execute(insert(QueryAudit.__table__), rows + distill)
        migrate.upgrade(url)
        assert_same_reports(db, now)
        rollup.catch_up(db, now=now + timedelta(minutes=5))
        assert_same_reports(db, now)
        migrate.downgrade(url, "0002")  # the rows stay
        with db.session() as s:
            assert s.scalar(select(func.count()).select_from(QueryAudit)) == len(rows) + len(distill)
        migrate.upgrade(url)
        assert_same_reports(db, now)
    finally:
        db.dispose()


@pytest.mark.parametrize("policy", ["sampled", "off"])
def test_row_policies_keep_fewer_rows_and_the_same_aggregates(database_url: str, policy: str) -> None:
    db = Database(database_url)
    try:
        now = utcnow()
        predict, _ = traffic(now, [(1, 1)])
        writer = AggregateWriter(AggregateConfig(rows=policy, sample_rate=0.25, rng=random.Random(3)))  # type: ignore[arg-type]
        with db.write_connection() as conn:
            writer.write(conn, predict, new_token())
        with db.session() as s:
            kept = s.scalar(select(func.count()).select_from(QueryAudit))
            total = s.scalar(select(func.sum(UsageMinute.requests)))
            per_client = s.scalar(select(func.sum(ClientUsage.requests)))
        assert total == per_client == len(predict)
        if policy == "off":
            assert kept == 0
        else:  # 25 % of 705, binomial: 3 sigma is about 35
            assert abs(kept - 0.25 * len(predict)) < 40
    finally:
        db.dispose()


def test_a_batch_whose_commit_answer_was_lost_is_applied_once(database_url: str) -> None:
    db = Database(database_url)
    queue = AuditQueue(db, AuditQueueConfig(retry_s=0.01), writer=AggregateWriter(AggregateConfig(rows="on")))
    real = queue._write
    calls = {"n": 0}

    def commit_then_fail(batch: list[AuditRecord], token: str) -> None:
        real(batch, token)
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("the answer to COMMIT was lost")

    queue._write = commit_then_fail  # type: ignore[method-assign]
    try:
        now = utcnow()
        for i in range(10):
            queue.submit(AuditRecord(PREDICT_ENDPOINT, "alpha", f"anon-{i}", 1, 200, 1.0, None, now))
        assert not queue._drain()
        assert queue._drain()
        with db.session() as s:
            assert s.scalar(select(func.sum(UsageMinute.requests))) == 10
            assert s.scalar(select(func.count()).select_from(QueryAudit)) == 10
        assert queue.pending == 0
    finally:
        db.dispose()


def _counts(db: Database) -> dict[str, int]:
    with db.session() as s:
        return {
            "predict_rows": s.scalar(select(func.count()).where(QueryAudit.endpoint == PREDICT_ENDPOINT))
            or 0,
            "distill_rows": s.scalar(select(func.count()).where(QueryAudit.endpoint == DISTILL_ENDPOINT))
            or 0,
            "usage_minutes": s.scalar(select(func.count()).select_from(UsageMinute)) or 0,
            "client_usage": s.scalar(select(func.count()).select_from(ClientUsage)) or 0,
            "client_days": s.scalar(select(func.count()).select_from(ClientDay)) or 0,
            "user_usage": s.scalar(select(func.count()).select_from(UserUsage)) or 0,
            "events": s.scalar(select(func.count()).select_from(SecurityEvent)) or 0,
            "flushes": s.scalar(select(func.count()).select_from(AuditFlush)) or 0,
        }


def test_prune_deletes_what_is_past_its_age_under_load_and_twice_is_a_no_op(database_url: str) -> None:
    db = Database(database_url)
    queue = AuditQueue(db, AuditQueueConfig(interval_s=0.01))
    try:
        now = utcnow()
        users = make_users(db)
        predict, distill = traffic(now, users)
        old_predict = [
            AuditRecord(
                r.endpoint,
                r.model,
                r.client_id,
                r.n_samples,
                r.status,
                r.latency_ms,
                None,
                r.created_at - timedelta(days=60),
            )
            for r in predict
        ]
        old_distill = [{**r, "created_at": r["created_at"] - timedelta(days=60)} for r in distill]
        # a call in flight: its reservation is open; the rollup stops before it, the prune never takes it
        open_reservation = {**distill[-1], "status": STATUS_RESERVED, "created_at": now}
        record(db, old_predict + predict, [*old_distill, *distill, open_reservation])
        rollup.catch_up(db, now=now + timedelta(minutes=5))
        with db.write() as s:
            s.add(SecurityEvent(action="old", outcome="ok", detail={}, created_at=now - timedelta(days=60)))
            s.add(SecurityEvent(action="new", outcome="ok", detail={}, created_at=now))
            s.execute(update(ApiKey).values(samples_used=123))
        before = _counts(db)
        with db.session() as s:
            kept_reports = _v(reports.usage_summary(s, since=now - timedelta(days=10), until=None))

        # under load: calls keep being recorded while the prune runs
        stop = threading.Event()
        submitted = {"n": 0}

        def load() -> None:
            while not stop.is_set():
                queue.submit(AuditRecord(PREDICT_ENDPOINT, "alpha", "anon-live", 1, 200, 1.0, None, utcnow()))
                submitted["n"] += 1
                stop.wait(0.002)

        queue.start()
        loader = threading.Thread(target=load)
        loader.start()
        policy = retention.RetentionPolicy(
            predict_rows_days=30, distill_rows_days=30, aggregates_days=30, events_days=30, batch=50
        )
        try:
            deleted = retention.prune(db, policy)
        finally:
            stop.set()
            loader.join()
            assert queue.flush()
        after = _counts(db)
        assert deleted["predict_rows"] == len(old_predict)
        assert deleted["distill_rows"] == len(old_distill)  # not the open reservation
        assert deleted["events"] == 1
        assert deleted["aggregates"] > 0
        assert after["distill_rows"] == len(distill) + 1
        with db.session() as s:
            assert s.scalar(select(func.count()).where(QueryAudit.status == STATUS_RESERVED)) == 1
            assert set(s.scalars(select(ApiKey.samples_used))) == {123}  # quotas untouched
            assert _v(reports.usage_summary(s, since=now - timedelta(days=10), until=None)) == kept_reports
            live = s.scalar(
                select(func.sum(ClientUsage.requests))
                .join(AuditClient, AuditClient.id == ClientUsage.client_ref)
                .where(AuditClient.client_id == "anon-live")
            )
        assert submitted["n"] > 0 and live == submitted["n"]  # every call recorded during the prune
        assert before["client_usage"] > after["client_usage"]

        again = retention.prune(db, policy)
        assert again == {
            "predict_rows": 0,
            "distill_rows": 0,
            "events": 0,
            "aggregates": 0,
            "flush_markers": 0,
        }
        assert retention.prune(db, policy) == again
    finally:
        queue.close()
        db.dispose()


def test_the_extraction_watch_past_the_client_windows_answers_from_the_daily_view(database_url: str) -> None:
    db = Database(database_url)
    try:
        now = utcnow()
        start = _hour(now) - timedelta(days=20)
        heavy = [
            AuditRecord(
                PREDICT_ENDPOINT, "alpha", "anon-heavy", 300, 200, 1.0, None, start + timedelta(minutes=i)
            )
            for i in range(5)
        ]
        light = [AuditRecord(PREDICT_ENDPOINT, "alpha", "anon-light", 10, 200, 1.0, None, start)]
        record(db, heavy + light, [])
        with db.session() as s:
            before = _v(
                reports.flagged_clients(
                    s,
                    since=now - timedelta(days=30),
                    until=now,
                    window_s=WINDOW_S,
                    threshold=THRESHOLD,
                    limit=10,
                )
            )
        deleted = retention.prune(db, retention.RetentionPolicy(client_windows_days=8))
        assert deleted["aggregates"] == 2  # the two clients' windows; their days stay
        with db.session() as s:
            after = _v(
                reports.flagged_clients(
                    s,
                    since=now - timedelta(days=30),
                    until=now,
                    window_s=WINDOW_S,
                    threshold=THRESHOLD,
                    limit=10,
                )
            )
        assert [(f["client"], f["samples"], f["max_window_samples"]) for f in before] == [
            ("anon-heavy", 1500, 1500)
        ]
        assert [(f["client"], f["samples"], f["max_window_samples"]) for f in after] == [
            ("anon-heavy", 1500, 1500)
        ]
    finally:
        db.dispose()
