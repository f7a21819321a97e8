"""Admin reports over the audit table: GET /admin/audits/export (CSV) and GET /admin/usage/timeline.

The export takes the same filters as GET /admin/audits; each export is recorded in `security_events`
(`audit.export`) with the acting admin and the number of rows. The timeline counts every audited call
(answered or refused) per endpoint and time bucket: the console's "requests over time" charts.
"""

from __future__ import annotations

import csv
import io
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response

from service.core.deps import AdminDep, DatabaseDep, SessionDep, client_id_of
from service.crud import events, reports
from service.db.models import QueryAudit
from service.routes.admin import MAX_BUCKETS, AuditFilterDep, Since, Until, _range
from service.schemas import ErrorResponse, TimelineBucketOut, TimelineOut, TimelineSeriesOut

router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    responses={422: {"model": ErrorResponse, "description": "Invalid parameters."}},
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
    responses={200: {"content": {"text/csv": {}}, "description": "RFC 4180 CSV with a header row."}},
)
def export_audits(
    request: Request,
    admin: AdminDep,
    db: DatabaseDep,
    f: AuditFilterDep,
    limit: Annotated[int, Query(ge=1, le=MAX_EXPORT_ROWS, description="Most rows exported.")] = 10_000,
) -> Response:
    with db.write() as s:
        rows, total = reports.list_audits(s, f, limit=limit, offset=0)
        body = audits_csv(rows)
        events.record_event(
            s,
            "audit.export",
            "ok",
            actor=admin,
            client_id=client_id_of(request),
            detail={"rows": len(rows), "total": total},
        )
    return Response(
        content=body,
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
)
def usage_timeline(
    admin: AdminDep,
    s: SessionDep,
    since: Since = None,
    until: Until = None,
    bucket_s: Annotated[int, Query(ge=60, le=31 * 86400, description="Width of one time bucket.")] = 3600,
) -> TimelineOut:
    start, end = _range(since, until, 86400)
    if (end - start).total_seconds() / bucket_s > MAX_BUCKETS:
        raise HTTPException(status_code=422, detail=f"more than {MAX_BUCKETS} buckets: widen bucket_s")
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
