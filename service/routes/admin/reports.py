"""Admin API, reports over the audit and security-event tables: audits (list, CSV export), security
events, usage per user, samples over time per client with the extraction flag, the extraction watch, and
the calls timeline.

The export takes the same filters as GET /admin/audits; each export is recorded in `security_events`
(`audit.export`) with the acting admin and the number of rows. The timeline counts every audited call
(answered or refused) per endpoint and time bucket: the console's "requests over time" charts.
"""

from __future__ import annotations

import csv
import io
from typing import Annotated, Any, Literal

from fastapi import Depends, HTTPException, Query, Request
from fastapi.responses import Response

from service.core.deps import AdminDep, DatabaseDep, SessionDep, client_id_of
from service.core.state import StateDep
from service.crud import admin_actions, audit_list, events, reports
from service.crud.accounts import NotFoundError
from service.crud.audit_list import AuditFilter
from service.crud.audit_principals import principal_names
from service.crud.buckets import GrainError
from service.db.models import QueryAudit
from service.routes.admin.common import (
    BucketSeconds,
    Limit,
    Offset,
    QueryId,
    Since,
    Until,
    admin_router,
    check_buckets,
    not_found,
    time_range,
    utc,
)
from service.schemas import ErrorResponse
from service.schemas_admin import (
    NAME_RE,
    TEXT,
    AuditOut,
    ClientVolumeOut,
    EventOut,
    ExtractionOut,
    Page,
    TimelineBucketOut,
    TimelineOut,
    TimelineSeriesOut,
    UsageOut,
)

router = admin_router()

# The export and the timeline take no body: their 422 says so.
_INVALID_QUERY: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorResponse, "description": "Invalid parameters."}
}
_UNKNOWN_NAME: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "`user_name` or `key_name` names no user / no API key."}
}


def audit_filter(
    user_id: QueryId = None,
    key_id: QueryId = None,
    user_name: Annotated[
        str | None, Query(max_length=100, pattern=NAME_RE, description="Calls of the user of this name.")
    ] = None,
    key_name: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=100,
            pattern=TEXT,
            description="Calls made with an API key of this name (every key so named; AND the user filters).",
        ),
    ] = None,
    model: Annotated[str | None, Query(max_length=128, pattern=TEXT)] = None,
    endpoint: Annotated[str | None, Query(max_length=32, pattern=TEXT, examples=["/distill-batch"])] = None,
    client_id: Annotated[str | None, Query(max_length=64, pattern=TEXT)] = None,
    status: Annotated[int | None, Query(ge=100, le=599)] = None,
    since: Since = None,
    until: Until = None,
) -> AuditFilter:
    """The audit filters shared by GET /admin/audits and GET /admin/audits/export."""
    return AuditFilter(
        user_id=user_id,
        key_id=key_id,
        user_name=user_name,
        key_name=key_name,
        model=model,
        endpoint=endpoint,
        client_id=client_id,
        status=status,
        since=utc(since),
        until=utc(until),
    )


AuditFilterDep = Annotated[AuditFilter, Depends(audit_filter)]


@router.get(
    "/audits", response_model=Page[AuditOut], summary="Query audits, newest first", responses=_UNKNOWN_NAME
)
def list_audits(
    admin: AdminDep, s: SessionDep, f: AuditFilterDep, limit: Limit = 100, offset: Offset = 0
) -> Page[AuditOut]:
    try:
        rows, total = audit_list.list_audits(s, f, limit=limit, offset=offset)
    except NotFoundError as exc:
        raise not_found(exc) from None
    users, keys = principal_names(s, rows)
    return Page[AuditOut](
        items=[
            AuditOut.model_validate(r).model_copy(
                update={
                    "user_name": users.get(r.user_id) if r.user_id is not None else None,
                    "key_name": keys.get(r.api_key_id) if r.api_key_id is not None else None,
                }
            )
            for r in rows
        ],
        total=total,
        limit=limit,
        offset=offset,
        total_capped=total.capped,
    )


@router.get(
    "/events", response_model=Page[EventOut], summary="Security events (admin actions, auth failures)"
)
def list_events(
    admin: AdminDep,
    s: SessionDep,
    action: Annotated[str | None, Query(max_length=48, pattern=TEXT)] = None,
    user_id: QueryId = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> Page[EventOut]:
    rows, total = events.list_events(s, action=action, user_id=user_id, limit=limit, offset=offset)
    return Page[EventOut](
        items=[EventOut.model_validate(r) for r in rows], total=total, limit=limit, offset=offset
    )


@router.get("/usage", response_model=Page[UsageOut], summary="Per-user usage summary")
def usage(
    admin: AdminDep,
    s: SessionDep,
    since: Since = None,
    until: Until = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> Page[UsageOut]:
    rows = reports.usage_summary(s, since=utc(since), until=utc(until))
    items = [UsageOut(**vars(u)) for u in rows[offset : offset + limit]]
    return Page[UsageOut](items=items, total=len(rows), limit=limit, offset=offset)


@router.get(
    "/usage/clients",
    response_model=Page[ClientVolumeOut],
    summary="Samples pulled over time, per user or per anonymous client, with the extraction flag",
)
def client_usage(
    state: StateDep,
    admin: AdminDep,
    s: SessionDep,
    kind: Literal["user", "anonymous"] = "anonymous",
    since: Since = None,
    until: Until = None,
    bucket_s: BucketSeconds = 3600,
    limit: Limit = 100,
    offset: Offset = 0,
) -> Page[ClientVolumeOut]:
    settings = state.settings
    start, end = time_range(since, until, 86400)
    check_buckets(start, end, bucket_s)
    try:
        rows, total = reports.client_volumes(
            s,
            kind=kind,
            since=start,
            until=end,
            bucket_s=bucket_s,
            window_s=settings.extraction_window_s,
            threshold=settings.extraction_sample_threshold,
            limit=limit,
            offset=offset,
            windows_days=settings.retain_client_windows_days,
        )
    except GrainError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    items = [ClientVolumeOut.model_validate(vars(r)) for r in rows]
    return Page[ClientVolumeOut](items=items, total=total, limit=limit, offset=offset)


@router.get(
    "/extraction", response_model=ExtractionOut, summary="Anonymous clients flagged as possible extraction"
)
def extraction(
    state: StateDep,
    admin: AdminDep,
    s: SessionDep,
    since: Since = None,
    until: Until = None,
    limit: Limit = 100,
) -> ExtractionOut:
    settings = state.settings
    window = settings.extraction_window_s
    threshold = settings.extraction_sample_threshold
    start, end = time_range(since, until, 7 * 86400)
    rows = reports.flagged_clients(
        s, since=start, until=end, window_s=window, threshold=threshold, limit=limit
    )
    flagged = [ClientVolumeOut.model_validate(vars(r)) for r in rows]
    return ExtractionOut(
        rule=(
            f"an anonymous client is flagged when the /predict samples answered to it within one "
            f"{window} s window (aligned on the Unix epoch) exceed {threshold}"
        ),
        window_s=window,
        threshold_samples=threshold,
        since=start,
        until=end,
        flagged=flagged,
    )


MAX_EXPORT_ROWS = 100_000
CSV_COLUMNS = (
    "id",
    "created_at",
    "endpoint",
    "model",
    "user_id",
    "api_key_id",
    "client_id",
    "n_samples",
    "status",
    "latency_ms",
    "input_digest",
)
# A cell starting with one of these is a formula in a spreadsheet (CSV injection): it gets a leading quote.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: object) -> str:
    if value is None:
        return ""
    text = value.isoformat() if hasattr(value, "isoformat") else str(value)
    if isinstance(value, str) and text.startswith(FORMULA_START):
        return "'" + text
    return text


def audits_csv(rows: list[QueryAudit]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow([_cell(getattr(r, c)) for c in CSV_COLUMNS])
    return out.getvalue()


@router.get(
    "/audits/export",
    response_class=Response,
    summary="Export audits as CSV, newest first (same filters as GET /admin/audits)",
    responses={
        **_INVALID_QUERY,
        **_UNKNOWN_NAME,
        200: {"content": {"text/csv": {}}, "description": "RFC 4180 CSV with a header row."},
    },
)
def export_audits(
    request: Request,
    admin: AdminDep,
    db: DatabaseDep,
    f: AuditFilterDep,
    limit: Annotated[int, Query(ge=1, le=MAX_EXPORT_ROWS, description="Most rows exported.")] = 10_000,
) -> Response:
    try:
        rows, total = admin_actions.export_audits(db, f, limit, actor=admin, client_id=client_id_of(request))
    except NotFoundError as exc:
        raise not_found(exc) from None
    return Response(
        content=audits_csv(rows),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": 'attachment; filename="sdb-audits.csv"',
            "X-Total-Count": str(total),
        },
    )


@router.get(
    "/usage/timeline",
    response_model=TimelineOut,
    summary="Calls over time per endpoint (answered, refused, samples), from the audits",
    responses=_INVALID_QUERY,
)
def usage_timeline(
    admin: AdminDep,
    s: SessionDep,
    since: Since = None,
    until: Until = None,
    bucket_s: BucketSeconds = 3600,
) -> TimelineOut:
    start, end = time_range(since, until, 86400)
    check_buckets(start, end, bucket_s)
    series = reports.request_timeline(s, start, end, bucket_s)
    return TimelineOut(
        since=start,
        until=end,
        bucket_s=bucket_s,
        series=[
            TimelineSeriesOut(endpoint=e, buckets=[TimelineBucketOut(**vars(b)) for b in buckets])
            for e, buckets in sorted(series.items())
        ],
    )
