"""The per-row reports as they were before the audit aggregates (0003), kept to check that the aggregates
answer the same numbers on the same traffic (tests/service/test_aggregates.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Integer, and_, case, cast, func, select
from sqlalchemy.orm import Session

from service.crud.audits import DISTILL_ENDPOINT, PREDICT_ENDPOINT
from service.db.models import QueryAudit, User


@dataclass(frozen=True)
class AuditFilter:
    user_id: int | None = None
    key_id: int | None = None
    model: str | None = None
    endpoint: str | None = None
    client_id: str | None = None
    status: int | None = None
    since: datetime | None = None
    until: datetime | None = None

    def apply(self, q: Any) -> Any:
        conds = []
        if self.user_id is not None:
            conds.append(QueryAudit.user_id == self.user_id)
        if self.key_id is not None:
            conds.append(QueryAudit.api_key_id == self.key_id)
        if self.model is not None:
            conds.append(QueryAudit.model == self.model)
        if self.endpoint is not None:
            conds.append(QueryAudit.endpoint == self.endpoint)
        if self.client_id is not None:
            conds.append(QueryAudit.client_id == self.client_id)
        if self.status is not None:
            conds.append(QueryAudit.status == self.status)
        if self.since is not None:
            conds.append(QueryAudit.created_at >= self.since)
        if self.until is not None:
            conds.append(QueryAudit.created_at < self.until)
        return q.where(and_(*conds)) if conds else q


def list_audits(session: Session, f: AuditFilter, *, limit: int, offset: int) -> tuple[list[QueryAudit], int]:
    q = f.apply(select(QueryAudit))
    total = session.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = session.scalars(q.order_by(QueryAudit.id.desc()).limit(limit).offset(offset)).all()
    return list(rows), int(total)


@dataclass
class UserUsage:
    user_id: int
    name: str
    role: str
    disabled: bool
    requests: int = 0
    answered: int = 0
    samples: int = 0
    rejected: int = 0
    last_seen: datetime | None = None
    by_model: dict[str, int] = field(default_factory=dict)


def usage_summary(session: Session, *, since: datetime | None, until: datetime | None) -> list[UserUsage]:
    """Per user: requests, answered requests, samples answered (status 200) and refusals, by model."""
    f = AuditFilter(since=since, until=until)
    users = {u.id: UserUsage(u.id, u.name, u.role, u.disabled) for u in session.scalars(select(User))}
    ok = QueryAudit.status == 200
    q = f.apply(
        select(
            QueryAudit.user_id,
            QueryAudit.model,
            func.count(),
            func.sum(ok.cast(Integer)),
            func.sum(QueryAudit.n_samples * ok.cast(Integer)),
            func.sum((QueryAudit.status >= 400).cast(Integer)),
            func.max(QueryAudit.created_at),
        ).where(QueryAudit.user_id.is_not(None))
    ).group_by(QueryAudit.user_id, QueryAudit.model)
    for user_id, model, n, answered, samples, rejected, last in session.execute(q):
        u = users.get(user_id)
        if u is None:
            continue
        u.requests += int(n)
        u.answered += int(answered or 0)
        u.samples += int(samples or 0)
        u.rejected += int(rejected or 0)
        if model is not None and samples:
            u.by_model[model] = u.by_model.get(model, 0) + int(samples)
        last = _as_utc(last)
        if last is not None and (u.last_seen is None or last > u.last_seen):
            u.last_seen = last
    return sorted(users.values(), key=lambda u: u.user_id)


def _as_utc(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):  # SQLite aggregates return the stored text
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _epoch(session: Session) -> Any:
    if session.get_bind().dialect.name == "sqlite":
        return cast(func.strftime("%s", QueryAudit.created_at), Integer)
    return cast(func.floor(func.extract("epoch", QueryAudit.created_at)), Integer)


@dataclass
class ClientVolume:
    kind: str  # "user" or "anonymous"
    client: str  # user id (as text) or anonymous client id
    name: str | None
    requests: int
    samples: int
    max_window_samples: int
    flagged: bool
    series: list[dict[str, Any]]


def client_volumes(
    session: Session,
    *,
    kind: str,
    since: datetime,
    until: datetime,
    bucket_s: int,
    window_s: int,
    threshold: int,
    limit: int,
    offset: int,
) -> tuple[list[ClientVolume], int]:
    """Samples answered over time per user (/distill-batch) or per anonymous client (/predict).

    The extraction flag: an anonymous client is flagged when the /predict samples it pulled in any fixed
    window of `window_s` seconds (aligned on the Unix epoch) exceed `threshold`. Users are licensed to
    distill and bounded by their quota, so their volume is reported but not flagged.
    """
    epoch = _epoch(session)
    if kind == "user":
        who: Any = QueryAudit.user_id
        base = AuditFilter(endpoint=DISTILL_ENDPOINT, status=200, since=since, until=until)
        cond: Any = QueryAudit.user_id.is_not(None)
    else:
        who = QueryAudit.client_id
        base = AuditFilter(endpoint=PREDICT_ENDPOINT, status=200, since=since, until=until)
        cond = and_(QueryAudit.client_id.is_not(None), QueryAudit.user_id.is_(None))
    totals_q = base.apply(select(who, func.count(), func.sum(QueryAudit.n_samples)).where(cond)).group_by(who)
    totals = sorted(
        ((c, int(n), int(s or 0)) for c, n, s in session.execute(totals_q)), key=lambda r: (-r[2], str(r[0]))
    )
    page = totals[offset : offset + limit]
    ids = [c for c, _, _ in page]
    if not ids:
        return [], len(totals)

    def buckets(size: int) -> dict[Any, dict[int, tuple[int, int]]]:
        b = epoch // size
        q = base.apply(
            select(who, b, func.count(), func.sum(QueryAudit.n_samples)).where(cond, who.in_(ids))
        ).group_by(who, b)
        out: dict[Any, dict[int, tuple[int, int]]] = {}
        for c, k, n, s in session.execute(q):
            out.setdefault(c, {})[int(k)] = (int(n), int(s or 0))
        return out

    series = buckets(bucket_s)
    windows = buckets(window_s) if kind != "user" else {}
    names: dict[Any, str] = {}
    if kind == "user":
        names = {u.id: u.name for u in session.scalars(select(User).where(User.id.in_(ids)))}
    result = []
    for c, n, s in page:
        max_win = max((v[1] for v in windows.get(c, {}).values()), default=0)
        result.append(
            ClientVolume(
                kind=kind,
                client=str(c),
                name=names.get(c),
                requests=n,
                samples=s,
                max_window_samples=max_win,
                flagged=kind != "user" and max_win > threshold,
                series=[
                    {"start": datetime.fromtimestamp(k * bucket_s, UTC), "requests": v[0], "samples": v[1]}
                    for k, v in sorted(series.get(c, {}).items())
                ],
            )
        )
    return result, len(totals)


@dataclass
class TimelineBucket:
    start: datetime
    requests: int
    answered: int
    refused: int
    samples: int


def request_timeline(
    session: Session, since: datetime, until: datetime, bucket_s: int
) -> dict[str, list[TimelineBucket]]:
    """Calls per endpoint and bucket of `bucket_s` seconds in [since, until), from the audit table."""
    bucket = _epoch(session) // bucket_s
    ok = QueryAudit.status == 200
    q = (
        select(
            QueryAudit.endpoint,
            bucket,
            func.count(),
            func.sum(case((ok, 1), else_=0)),
            func.sum(case((QueryAudit.status >= 400, 1), else_=0)),
            func.sum(case((ok, QueryAudit.n_samples), else_=0)),
        )
        .where(QueryAudit.created_at >= since, QueryAudit.created_at < until)
        .group_by(QueryAudit.endpoint, bucket)
        .order_by(QueryAudit.endpoint, bucket)
    )
    out: dict[str, list[TimelineBucket]] = {}
    for endpoint, k, n, answered, refused, samples in session.execute(q):
        out.setdefault(endpoint, []).append(
            TimelineBucket(
                start=datetime.fromtimestamp(int(k) * bucket_s, UTC),
                requests=int(n),
                answered=int(answered or 0),
                refused=int(refused or 0),
                samples=int(samples or 0),
            )
        )
    return out
