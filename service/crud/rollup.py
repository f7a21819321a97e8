"""The /distill-batch rollup: per-call rows (which stay: billing and security records) summed into
`user_usage` (per user, model, status and hour) and `usage_minutes` (per minute, model and status).

It reads query_audits by id from the watermark in `audit_rollups` ('distill'), in batches, and stops before
the first row that is not settled: still reserved (status 102, its status will change) or younger than
SETTLE_S (a transaction with a lower id may not have committed yet). A row's status never changes once it
is not 102, so a rolled row is final. The watermark row is locked for the batch (FOR UPDATE on PostgreSQL,
BEGIN IMMEDIATE on SQLite): any number of processes may run it. Readers add the rows above the watermark
(a minute or two of calls) to the aggregates, so reports are exact at any time.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Integer, and_, cast, delete, func, literal, or_, select, update

from service.crud.audits import DISTILL_ENDPOINT, STATUS_RESERVED
from service.db.aggregates import greatest, upsert
from service.db.models import AuditFlush, AuditRollup, QueryAudit, UsageMinute, UserUsage, utcnow
from service.db.session import Database

DISTILL = "distill"
SETTLE_S = 60.0
BATCH_ROWS = 50_000
USER_BUCKET_MIN = 60
FLUSH_MARKERS_KEPT = timedelta(hours=1)


def minute_expr(dialect: str, col: Any = QueryAudit.created_at) -> Any:
    """Whole minutes since the Unix epoch of a UTC timestamp column."""
    if dialect == "sqlite":
        return cast(func.strftime("%s", col), Integer) // 60
    return cast(func.floor(func.extract("epoch", col) / 60), Integer)


def watermark(conn: Any, *, lock: bool = False) -> int:
    q = select(AuditRollup.last_id).where(AuditRollup.name == DISTILL)
    if lock:
        q = q.with_for_update()
    value = conn.execute(q).scalar_one_or_none()
    return int(value or 0)


def roll_distill(db: Database, *, now: datetime | None = None, batch: int = BATCH_ROWS) -> int:
    """Roll one batch of settled /distill-batch rows; returns how many rows it rolled (0: caught up)."""
    cutoff = (now or utcnow()) - timedelta(seconds=SETTLE_S)
    with db.write_connection() as conn:
        dialect = conn.dialect.name
        lo = watermark(conn, lock=True)
        distill = and_(QueryAudit.id > lo, QueryAudit.endpoint == DISTILL_ENDPOINT)
        blocker = conn.execute(
            select(func.min(QueryAudit.id)).where(
                distill, or_(QueryAudit.status == STATUS_RESERVED, QueryAudit.created_at >= cutoff)
            )
        ).scalar()
        ids = select(QueryAudit.id).where(distill).order_by(QueryAudit.id).limit(batch)
        if blocker is not None:
            ids = ids.where(QueryAudit.id < blocker)
        sub = ids.subquery()
        hi, n = conn.execute(select(func.max(sub.c.id), func.count()).select_from(sub)).one()
        if not n:
            return 0
        rows = and_(QueryAudit.id > lo, QueryAudit.id <= hi, QueryAudit.endpoint == DISTILL_ENDPOINT)
        minute = minute_expr(dialect)
        model = func.coalesce(QueryAudit.model, "")
        _insert_select(
            conn,
            UsageMinute.__table__,
            ("minute", "endpoint", "model", "status"),
            select(
                minute,
                literal(DISTILL_ENDPOINT),
                model,
                QueryAudit.status,
                func.count(),
                func.sum(QueryAudit.n_samples),
            )
            .where(rows)
            .group_by(minute, model, QueryAudit.status),
            ("requests", "samples"),
        )
        hour = minute // USER_BUCKET_MIN * USER_BUCKET_MIN
        _insert_select(
            conn,
            UserUsage.__table__,
            ("minute", "user_id", "model", "status"),
            select(
                hour,
                QueryAudit.user_id,
                model,
                QueryAudit.status,
                func.count(),
                func.sum(QueryAudit.n_samples),
                func.max(QueryAudit.created_at),
            )
            .where(rows, QueryAudit.user_id.is_not(None))
            .group_by(hour, QueryAudit.user_id, model, QueryAudit.status),
            ("requests", "samples"),
            peak=("last_at",),
        )
        conn.execute(
            update(AuditRollup).where(AuditRollup.name == DISTILL).values(last_id=hi, updated_at=utcnow())
        )
        return int(n)


def _insert_select(
    conn: Any, table: Any, keys: tuple[str, ...], query: Any, add: tuple[str, ...], peak: tuple[str, ...] = ()
) -> None:
    cols = [*keys, *add, *peak]
    ins = upsert(conn, table, keys).from_select(cols, query)
    set_: dict[str, Any] = {c: table.c[c] + ins.excluded[c] for c in add}
    set_.update({c: greatest(conn, table.c[c], ins.excluded[c]) for c in peak})
    conn.execute(ins.on_conflict_do_update(index_elements=list(keys), set_=set_))


def catch_up(db: Database, *, now: datetime | None = None, max_batches: int = 20) -> int:
    """Roll settled rows until caught up (at most `max_batches` batches); returns the rows rolled."""
    total = 0
    for _ in range(max_batches):
        n = roll_distill(db, now=now)
        total += n
        if n == 0:
            break
    return total


def maintain(db: Database) -> int:
    """The audit writer's periodic work: the rollup, and flush markers past their use."""
    rolled = catch_up(db)
    with db.write_connection() as conn:
        conn.execute(delete(AuditFlush).where(AuditFlush.created_at < utcnow() - FLUSH_MARKERS_KEPT))
    return rolled


def epoch_minute(t: datetime) -> int:
    return int(t.astimezone(UTC).timestamp()) // 60


__all__ = ["catch_up", "maintain", "minute_expr", "roll_distill", "watermark"]
