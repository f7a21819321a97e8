"""Retention (`sdb db prune`): delete audit rows, aggregates and security events past their ages.

Safe while the service serves: every delete is a small transaction (BATCH rows, or one bucket of an
aggregate), so writers wait at most one batch; only buckets older than the cutoff are touched, and the
writers only ever upsert the current ones. Idempotent: a second run finds nothing to delete. Never deleted:
/distill-batch rows the rollup has not summed yet, reservations still open (status 102; the sweep needs
them), and `audit_clients` (the writers cache its ids; one small row per distinct client). Quotas are
counters on `api_keys`, never recomputed from rows, so no deletion changes what a key may still pull.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select

from service.crud import rollup
from service.crud.audits import DISTILL_ENDPOINT, STATUS_RESERVED
from service.db.models import (
    AuditFlush,
    ClientDay,
    ClientUsage,
    QueryAudit,
    SecurityEvent,
    UsageMinute,
    UserUsage,
    utcnow,
)
from service.db.session import Database


@dataclass(frozen=True)
class RetentionPolicy:
    predict_rows_days: float = 7  # per-request /predict rows (and any endpoint other than /distill-batch)
    distill_rows_days: float = 400  # per-call /distill-batch rows: billing records
    aggregates_days: float = 400
    client_windows_days: float = 8  # client_usage: per client and window; client_days keeps the daily view
    events_days: float = 400
    batch: int = 5_000
    pause_s: float = 0.0  # between batches, to leave the database to the service


def _batched_ids(db: Database, model: Any, where: list[Any], policy: RetentionPolicy) -> int:
    total = 0
    while True:
        with db.write_connection() as conn:
            ids = select(model.id).where(*where).order_by(model.id).limit(policy.batch)
            n = conn.execute(delete(model).where(model.id.in_(ids.scalar_subquery()))).rowcount
        total += n
        if n < policy.batch:
            return total
        time.sleep(policy.pause_s)


def _batched_buckets(db: Database, column: Any, cutoff: int, step: int, policy: RetentionPolicy) -> int:
    """Delete rows whose bucket column < cutoff, `step` minutes per transaction, oldest first (each delete
    a bounded range, so that it reads only its own pages)."""
    with db.session() as s:
        lo = s.execute(select(func.min(column)).where(column < cutoff)).scalar()
    if lo is None:
        return 0
    total = 0
    lo = int(lo)
    while lo < cutoff:
        hi = min(lo + step, cutoff)
        with db.write_connection() as conn:
            total += conn.execute(delete(column.table).where(column >= lo, column < hi)).rowcount
        lo = hi
        time.sleep(policy.pause_s)
    return total


def prune(db: Database, policy: RetentionPolicy, *, now: datetime | None = None) -> dict[str, int]:
    """Delete what is past its age; returns how many rows went, per kind."""
    now = now or utcnow()

    def cutoff(days: float) -> datetime:
        return now - timedelta(days=days)

    def minute(days: float) -> int:
        return rollup.epoch_minute(cutoff(days))

    with db.session() as s:
        rolled = rollup.watermark(s)
    out = {
        "predict_rows": _batched_ids(
            db,
            QueryAudit,
            [
                QueryAudit.created_at < cutoff(policy.predict_rows_days),
                QueryAudit.endpoint != DISTILL_ENDPOINT,
            ],
            policy,
        ),
        "distill_rows": _batched_ids(
            db,
            QueryAudit,
            [
                QueryAudit.created_at < cutoff(policy.distill_rows_days),
                QueryAudit.endpoint == DISTILL_ENDPOINT,
                QueryAudit.id <= rolled,
                QueryAudit.status != STATUS_RESERVED,
            ],
            policy,
        ),
        "events": _batched_ids(
            db, SecurityEvent, [SecurityEvent.created_at < cutoff(policy.events_days)], policy
        ),
    }
    agg = minute(policy.aggregates_days)
    out["aggregates"] = (
        _batched_buckets(db, UsageMinute.minute, agg, 60, policy)
        + _batched_buckets(db, ClientUsage.minute, max(agg, minute(policy.client_windows_days)), 60, policy)
        + _batched_buckets(db, ClientDay.day, agg, 1440, policy)
        + _batched_buckets(db, UserUsage.minute, agg, 1440, policy)
    )
    with db.write_connection() as conn:
        old = AuditFlush.created_at < now - rollup.FLUSH_MARKERS_KEPT
        out["flush_markers"] = conn.execute(delete(AuditFlush).where(old)).rowcount
    return out
