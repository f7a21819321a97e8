"""What the admin routes share: their router settings, query and path parameters, time ranges, 404s."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query

from service.crud.accounts import NotFoundError
from service.db.models import utcnow
from service.schemas import ErrorResponse

MAX_BUCKETS = 10_000

Since = Annotated[datetime | None, Query(description="From this time (inclusive, ISO 8601).")]
Until = Annotated[datetime | None, Query(description="Until this time (exclusive, ISO 8601).")]
Limit = Annotated[int, Query(ge=1, le=1000, description="Page size.")]
Offset = Annotated[int, Query(ge=0, le=10_000_000, description="Rows to skip.")]
# Ids are bounded to the BIGINT range: a larger number is a 422, not a database driver overflow (500).
MAX_ID = 2**63 - 1
PathId = Annotated[int, Path(ge=1, le=MAX_ID)]
QueryId = Annotated[int | None, Query(ge=1, le=MAX_ID)]
BucketSeconds = Annotated[int, Query(ge=60, le=31 * 86400, description="Width of one time bucket.")]

# Errors raised by the routes themselves carry a string `detail`: document 422 with the generic error model.
INVALID_PARAMETERS: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorResponse, "description": "Invalid parameters or body."}
}


def admin_router() -> APIRouter:
    """A router of /admin routes (administrator tokens only: each route takes `AdminDep`)."""
    return APIRouter(prefix="/admin", tags=["admin"], responses=INVALID_PARAMETERS)


def not_found(exc: NotFoundError) -> HTTPException:
    return HTTPException(status_code=404, detail=str(exc))


def utc(value: datetime | None) -> datetime | None:
    """An aware UTC time (a naive one is taken as UTC); 422 for a time out of range."""
    if value is None:
        return None
    try:
        out = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        out.timestamp()
    except (OverflowError, ValueError, OSError):
        raise HTTPException(status_code=422, detail="time out of range") from None
    return out


def time_range(since: datetime | None, until: datetime | None, default_s: int) -> tuple[datetime, datetime]:
    """[since, until) in UTC: until defaults to now, since to `default_s` before until; 422 if empty."""
    end = utc(until) or utcnow()
    try:
        start = utc(since) or end - timedelta(seconds=default_s)
    except OverflowError:
        raise HTTPException(status_code=422, detail="time out of range") from None
    if start >= end:
        raise HTTPException(status_code=422, detail="since must be before until")
    return start, end


def check_buckets(start: datetime, end: datetime, bucket_s: int) -> None:
    if (end - start).total_seconds() / bucket_s > MAX_BUCKETS:
        raise HTTPException(status_code=422, detail=f"more than {MAX_BUCKETS} buckets: widen bucket_s")
