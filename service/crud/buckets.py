"""The time buckets of the aggregates: a range [since, until) widened to whole buckets of `grain_min` minutes
since the Unix epoch (the aggregates hold whole buckets), and the check that a report's bucket is a whole
number of them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from service.crud.rollup import epoch_minute


class GrainError(ValueError):
    """A bucket finer than the aggregates it is computed from."""


def floor_minute(t: datetime | None, grain_min: int) -> int | None:
    return None if t is None else epoch_minute(t) // grain_min * grain_min


def ceil_minute(t: datetime | None, grain_min: int) -> int | None:
    if t is None:
        return None
    seconds = int(t.astimezone(UTC).timestamp())
    m = -(-seconds // 60)
    return -(-m // grain_min) * grain_min


def minute_range(col: Any, since: datetime | None, until: datetime | None, grain_min: int) -> list[Any]:
    """Conditions on `col` for [since, until), widened to whole buckets of `grain_min` minutes."""
    conds = []
    lo, hi = floor_minute(since, grain_min), ceil_minute(until, grain_min)
    if lo is not None:
        conds.append(col >= lo)
    if hi is not None:
        conds.append(col < hi)
    return conds


def time_range(since: datetime | None, until: datetime | None, grain_min: int) -> tuple[Any, Any]:
    lo, hi = floor_minute(since, grain_min), ceil_minute(until, grain_min)
    return (
        None if lo is None else datetime.fromtimestamp(lo * 60, UTC),
        None if hi is None else datetime.fromtimestamp(hi * 60, UTC),
    )


def check_grain(bucket_s: int, grain_min: int) -> None:
    if bucket_s % (grain_min * 60):
        raise GrainError(
            f"bucket_s must be a multiple of {grain_min * 60} s: the usage aggregates are kept per "
            f"{grain_min * 60} s"
        )
