"""Reports over the audit trail: per-user usage, per-client volumes over time, the extraction watch and the
timeline, from the aggregates (service.db.aggregates, service.crud.rollup) whose size does not grow with the
number of calls recorded. The per-call rows' listing is service.crud.audit_list."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, Integer, case, cast, func, select
from sqlalchemy.orm import Session

from service.crud import rollup
from service.crud.audits import DISTILL_ENDPOINT
from service.crud.buckets import ceil_minute, check_grain, floor_minute, minute_range, time_range
from service.crud.client_ranking import answered_windows, ranked_sums
from service.crud.rollup import epoch_minute
from service.db.aggregates import MINUTES_PER_DAY
from service.db.models import AuditClient, ClientDay, QueryAudit, User, utcnow
from service.db.models import ClientUsage as CU
from service.db.models import UsageMinute as UM
from service.db.models import UserUsage as UU


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


def _unrolled(session: Session, since: datetime | None, until: datetime | None, grain_min: int) -> list[Any]:
    """Conditions for the /distill-batch rows the rollup has not summed yet (above its watermark)."""
    lo, hi = time_range(since, until, grain_min)
    conds = [QueryAudit.id > rollup.watermark(session), QueryAudit.endpoint == DISTILL_ENDPOINT]
    if lo is not None:
        conds.append(QueryAudit.created_at >= lo)
    if hi is not None:
        conds.append(QueryAudit.created_at < hi)
    return conds


def usage_summary(session: Session, *, since: datetime | None, until: datetime | None) -> list[UserUsage]:
    """Per user: requests, answered requests, samples answered (status 200) and refusals, by model.

    From `user_usage` (hours) plus the /distill-batch rows not rolled up yet; the range is widened to whole
    hours."""
    users = {u.id: UserUsage(u.id, u.name, u.role, u.disabled) for u in session.scalars(select(User))}
    grain = rollup.USER_BUCKET_MIN
    agg = (
        select(
            UU.user_id,
            UU.model,
            UU.status,
            func.sum(UU.requests),
            func.sum(UU.samples),
            func.max(UU.last_at),
        )
        .where(*minute_range(UU.minute, since, until, grain))
        .group_by(UU.user_id, UU.model, UU.status)
    )
    model = func.coalesce(QueryAudit.model, "")
    raw = (
        select(
            QueryAudit.user_id,
            model,
            QueryAudit.status,
            func.count(),
            func.sum(QueryAudit.n_samples),
            func.max(QueryAudit.created_at),
        )
        .where(*_unrolled(session, since, until, grain), QueryAudit.user_id.is_not(None))
        .group_by(QueryAudit.user_id, model, QueryAudit.status)
    )
    for q in (agg, raw):
        for user_id, model_name, status, n, samples, last in session.execute(q):
            u = users.get(user_id) if user_id is not None else None
            if u is None:
                continue
            n, samples = int(n), int(samples or 0)
            u.requests += n
            if status == 200:
                u.answered += n
                u.samples += samples
                if model_name and samples:
                    u.by_model[model_name] = u.by_model.get(model_name, 0) + samples
            if status >= 400:
                u.rejected += n
            seen = _as_utc(last)
            if seen is not None and (u.last_seen is None or seen > u.last_seen):
                u.last_seen = seen
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
    windows_days: float | None = None,
) -> tuple[list[ClientVolume], int]:
    """Samples answered over time per user (/distill-batch) or per anonymous client (/predict).

    The extraction flag: an anonymous client is flagged when the /predict samples it pulled in any fixed
    window of `window_s` seconds (aligned on the Unix epoch) exceed `threshold`. Users are licensed to
    distill and bounded by their quota, so their volume is reported but not flagged. Anonymous volumes come
    from `client_usage` (one row per client, window and status), users' from `user_usage` (hours) plus the
    rows not rolled up yet: the range is widened to whole windows (hours), and `bucket_s` must be a
    multiple of them (GrainError). `windows_days`: the days of client windows retention keeps
    (SDB_RETAIN_CLIENT_WINDOWS_DAYS; None: all), see `client_ranking.ranked_sums`.
    """
    if kind == "user":
        return _user_volumes(session, since, until, bucket_s, limit, offset)
    return _anonymous_volumes(
        session, since, until, bucket_s, window_s, threshold, limit, offset, None, windows_days
    )


def _series(points: dict[int, list[int]], bucket_s: int) -> list[dict[str, Any]]:
    return [
        {"start": datetime.fromtimestamp(k * bucket_s, UTC), "requests": v[0], "samples": v[1]}
        for k, v in sorted(points.items())
    ]


def _anonymous_volumes(
    session: Session,
    since: datetime,
    until: datetime,
    bucket_s: int,
    window_s: int,
    threshold: int,
    limit: int,
    offset: int,
    only: list[int] | None,
    windows_days: float | None = None,
) -> tuple[list[ClientVolume], int]:
    grain = window_s // 60
    check_grain(bucket_s, grain)
    lo, hi = floor_minute(since, grain), ceil_minute(until, grain)
    in_range = answered_windows(lo, hi, only)
    now = epoch_minute(utcnow())
    kept = None if windows_days is None else now - int(windows_days * MINUTES_PER_DAY)
    sums = ranked_sums(lo, hi, grain, only, kept, now)
    # sorted and paged in the database: most samples first, then by id (byte order, as Python sorts)
    name = AuditClient.client_id
    if session.get_bind().dialect.name == "postgresql":
        name = name.collate("C")  # type: ignore[assignment]
    q = (
        select(sums.c.ref, sums.c.n, sums.c.s, AuditClient.client_id, func.count().over())
        .join(AuditClient, AuditClient.id == sums.c.ref)
        .order_by(sums.c.s.desc(), name)
        .limit(limit)
        .offset(offset)
    )
    names: dict[int, str] = {}
    page: list[tuple[int, int, int]] = []
    n_clients = 0
    for ref, n, samples, client, total in session.execute(q):
        page.append((int(ref), int(n), int(samples or 0)))
        names[int(ref)] = str(client)
        n_clients = int(total)
    if not page:
        return [], int(session.scalar(select(func.count()).select_from(sums)) or 0)
    ids = [c for c, _, _ in page]
    series: dict[int, dict[int, list[int]]] = {}
    windows: dict[int, dict[int, int]] = {}
    q = select(CU.client_ref, CU.minute, CU.requests, CU.samples).where(CU.client_ref.in_(ids), *in_range)
    for c, minute, n, s in session.execute(q):
        point = series.setdefault(c, {}).setdefault(minute * 60 // bucket_s, [0, 0])
        point[0] += n
        point[1] += s
        w = windows.setdefault(c, {})
        w[minute * 60 // window_s] = w.get(minute * 60 // window_s, 0) + s
    out = []
    for c, n, s in page:
        max_win = max(windows.get(c, {}).values(), default=0)
        out.append(
            ClientVolume(
                kind="anonymous",
                client=names[c],
                name=None,
                requests=n,
                samples=s,
                max_window_samples=max_win,
                flagged=max_win > threshold,
                series=_series(series.get(c, {}), bucket_s),
            )
        )
    return out, n_clients


def _client_names(session: Session, refs: list[int]) -> dict[int, str]:
    out: dict[int, str] = {}
    for i in range(0, len(refs), 5000):
        chunk = refs[i : i + 5000]
        q = select(AuditClient.id, AuditClient.client_id).where(AuditClient.id.in_(chunk))
        out.update((int(i), str(c)) for i, c in session.execute(q))
    return out


def _user_volumes(
    session: Session, since: datetime, until: datetime, bucket_s: int, limit: int, offset: int
) -> tuple[list[ClientVolume], int]:
    grain = rollup.USER_BUCKET_MIN
    check_grain(bucket_s, grain)
    points: dict[int, dict[int, list[int]]] = {}
    agg = (
        select(UU.user_id, UU.minute, func.sum(UU.requests), func.sum(UU.samples))
        .where(UU.status == 200, *minute_range(UU.minute, since, until, grain))
        .group_by(UU.user_id, UU.minute)
    )
    for user_id, minute, n, s in session.execute(agg):
        p = points.setdefault(int(user_id), {}).setdefault(minute * 60 // bucket_s, [0, 0])
        p[0] += int(n)
        p[1] += int(s or 0)
    bucket = _epoch(session) // bucket_s
    raw = (
        select(QueryAudit.user_id, bucket, func.count(), func.sum(QueryAudit.n_samples))
        .where(
            *_unrolled(session, since, until, grain),
            QueryAudit.status == 200,
            QueryAudit.user_id.is_not(None),
        )
        .group_by(QueryAudit.user_id, bucket)
    )
    for user_id, k, n, s in session.execute(raw):
        p = points.setdefault(int(user_id), {}).setdefault(int(k), [0, 0])
        p[0] += int(n)
        p[1] += int(s or 0)
    totals = sorted(
        ((u, sum(v[0] for v in pts.values()), sum(v[1] for v in pts.values())) for u, pts in points.items()),
        key=lambda r: (-r[2], str(r[0])),
    )
    page = totals[offset : offset + limit]
    ids = [u for u, _, _ in page]
    names = {u.id: u.name for u in session.scalars(select(User).where(User.id.in_(ids)))} if ids else {}
    return [
        ClientVolume(
            kind="user",
            client=str(u),
            name=names.get(u),
            requests=n,
            samples=s,
            max_window_samples=0,
            flagged=False,
            series=_series(points[u], bucket_s),
        )
        for u, n, s in page
    ], len(totals)


def flagged_clients(
    session: Session, *, since: datetime, until: datetime, window_s: int, threshold: int, limit: int
) -> list[ClientVolume]:
    """Anonymous clients over the extraction threshold in [since, until), most samples first.

    Candidates come from `client_days` (each client's largest window per day, indexed), so the time does
    not depend on how many clients stayed below the threshold; their windows are then read exactly."""
    lo, hi = floor_minute(since, MINUTES_PER_DAY) or 0, ceil_minute(until, MINUTES_PER_DAY) or 0
    refs = [
        int(c)
        for (c,) in session.execute(
            select(ClientDay.client_ref)
            .where(ClientDay.day >= lo, ClientDay.day < hi, ClientDay.peak_window_samples > threshold)
            .distinct()
        )
    ]
    if not refs:
        return []
    rows, _ = _anonymous_volumes(session, since, until, window_s, window_s, threshold, len(refs), 0, refs)
    flagged = [r for r in rows if r.flagged]
    # candidates without a window left in their days: past SDB_RETAIN_CLIENT_WINDOWS_DAYS (a candidate
    # with windows there but none in [since, until) pulled nothing in the range)
    kept = select(CU.client_ref).where(CU.client_ref.in_(refs), CU.minute >= lo, CU.minute < hi).distinct()
    pruned = sorted(set(refs) - {int(c) for c in session.scalars(kept)})
    if pruned:  # the daily view (whole days, daily series)
        flagged += _daily_volumes(session, pruned, lo, hi, threshold)
        flagged.sort(key=lambda r: (-r.samples, r.client))
    return flagged[:limit]


def _daily_volumes(session: Session, refs: list[int], lo: int, hi: int, threshold: int) -> list[ClientVolume]:
    names = _client_names(session, refs)
    days: dict[int, list[tuple[int, int, int, int]]] = {}
    q = select(
        ClientDay.client_ref,
        ClientDay.day,
        ClientDay.requests,
        ClientDay.samples,
        ClientDay.peak_window_samples,
    )
    for ref, day, n, samples, peak in session.execute(
        q.where(ClientDay.client_ref.in_(refs), ClientDay.day >= lo, ClientDay.day < hi)
    ):
        days.setdefault(int(ref), []).append((int(day), int(n), int(samples), int(peak)))
    out = []
    for ref, rows in days.items():
        peak = max(r[3] for r in rows)
        if peak <= threshold:
            continue
        out.append(
            ClientVolume(
                kind="anonymous",
                client=names[ref],
                name=None,
                requests=sum(r[1] for r in rows),
                samples=sum(r[2] for r in rows),
                max_window_samples=peak,
                flagged=True,
                series=[
                    {"start": datetime.fromtimestamp(d * 60, UTC), "requests": n, "samples": s}
                    for d, n, s, _ in sorted(rows)
                ],
            )
        )
    return out


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
    """Calls per endpoint and bucket of `bucket_s` seconds in [since, until) widened to whole minutes, from
    `usage_minutes` plus the /distill-batch rows not rolled up yet. A minute counts in the bucket where it
    starts."""
    acc: dict[tuple[str, int], list[int]] = {}
    ok = UM.status == 200
    bucket = cast(UM.minute, BigInteger) * 60 // bucket_s
    agg = (
        select(
            UM.endpoint,
            bucket,
            func.sum(UM.requests),
            func.sum(case((ok, UM.requests), else_=0)),
            func.sum(case((UM.status >= 400, UM.requests), else_=0)),
            func.sum(case((ok, UM.samples), else_=0)),
        )
        .where(*minute_range(UM.minute, since, until, 1))
        .group_by(UM.endpoint, bucket)
    )
    raw_ok = QueryAudit.status == 200
    raw_bucket = _epoch(session) // bucket_s
    raw = (
        select(
            QueryAudit.endpoint,
            raw_bucket,
            func.count(),
            func.sum(case((raw_ok, 1), else_=0)),
            func.sum(case((QueryAudit.status >= 400, 1), else_=0)),
            func.sum(case((raw_ok, QueryAudit.n_samples), else_=0)),
        )
        .where(*_unrolled(session, since, until, 1))
        .group_by(QueryAudit.endpoint, raw_bucket)
    )
    for q in (agg, raw):
        for endpoint, k, *values in session.execute(q):
            a = acc.setdefault((endpoint, int(k)), [0, 0, 0, 0])
            for i, v in enumerate(values):
                a[i] += int(v or 0)
    out: dict[str, list[TimelineBucket]] = {}
    for (endpoint, k), (n, answered, refused, samples) in sorted(acc.items()):
        out.setdefault(endpoint, []).append(
            TimelineBucket(
                start=datetime.fromtimestamp(k * bucket_s, UTC),
                requests=n,
                answered=answered,
                refused=refused,
                samples=samples,
            )
        )
    return out
