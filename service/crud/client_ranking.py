"""The anonymous clients' ranking over a range: each client's answered calls and samples, summed from whole
half days of `client_days` and as few hourly windows of `client_usage` as the range allows (the clients
report and the extraction watch, service.crud.reports)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, union_all

from service.db.aggregates import HALF_DAY, MINUTES_PER_DAY, OK
from service.db.models import ClientDay
from service.db.models import ClientUsage as CU


def answered_windows(lo: int | None, hi: int | None, only: list[int] | None) -> list[Any]:
    """Conditions for the answered (200) client windows in [lo, hi) (None: open), of the `only` clients."""
    conds = [CU.status == OK]
    if lo is not None:
        conds.append(CU.minute >= lo)
    if hi is not None:
        conds.append(CU.minute < hi)
    if only is not None:
        conds.append(CU.client_ref.in_(only))
    return conds


def ranked_sums(
    lo: int | None, hi: int | None, grain: int, only: list[int] | None, kept: int | None, now: int
) -> Any:
    """Per anonymous client: (ref, requests, samples) answered in the windows [lo, hi), as a subquery.

    Summing every window of the range would read one row per client and window, so the time would grow
    with the traffic until each client has a row in every window. Whole half days come from `client_days`
    instead (one row per client and UTC day with its first half's sums; the audit writer's transaction
    keeps them the sums of the day's windows), and a part of a half day either from its windows or as the
    half's total minus the windows outside the range, whichever reads fewer windows: at most 6 hours of
    them at each end, none for a range of whole half days, and none after a range that ends after `now`
    (no window exists there yet: "the last 24 hours until now" reads at most 6 hours). Subtracting the
    windows before the range needs them kept: only from `kept` on (None: all kept). Windows that do not
    divide a half day: whole days, 12 hours at each end at most. Both forms are exact; only their cost
    differs."""
    day = MINUTES_PER_DAY
    unit = HALF_DAY if HALF_DAY % grain == 0 else day

    def windows(a: int | None, b: int | None, sign: int) -> Any:
        conds = answered_windows(a, b, only)
        ref = CU.client_ref.label("ref")
        if sign > 0:
            return select(ref, CU.requests.label("n"), CU.samples.label("s")).where(*conds)
        return select(ref, (-CU.requests).label("n"), (-CU.samples).label("s")).where(*conds)

    def days(a: int, b: int, n: Any, s: Any) -> Any:
        conds = [ClientDay.day >= a, ClientDay.day < b]
        if only is not None:
            conds.append(ClientDay.client_ref.in_(only))
        return select(ClientDay.client_ref.label("ref"), n.label("n"), s.label("s")).where(*conds)

    def halves(a: int, b: int) -> list[Any]:
        """The half days [a, b): whole days, the second half of the day before, the first of the day after."""
        n, s = ClientDay.requests, ClientDay.samples
        n1, s1 = ClientDay.first_half_requests, ClientDay.first_half_samples
        whole = (-(-a // day) * day, b // day * day)
        out = [days(*whole, n, s)] if whole[1] > whole[0] else []
        if a % day:  # the second half of the day a - HALF_DAY
            out.append(days(a - HALF_DAY, a - HALF_DAY + 1, n - n1, s - s1))
        if b % day:  # the first half of the day b - HALF_DAY
            out.append(days(b - HALF_DAY, b - HALF_DAY + 1, n1, s1))
        return out

    if lo is None or hi is None or day % grain or hi - lo < unit:
        parts = [windows(lo, hi, 1)]
    else:
        first, last = -(-lo // unit) * unit, hi // unit * unit  # the whole units [first, last)
        # the start unit's part [lo, first): directly, or the unit minus [first - unit, lo); the end unit's
        # part [last, hi): directly, or the unit minus [hi, last + unit)
        start_minus = lo - (first - unit) < first - lo and (kept is None or first - unit >= kept)
        end_minus = hi > last and (last + unit - hi < hi - last or hi > now)
        u0, u1 = first - unit if start_minus else first, last + unit if end_minus else last
        a, b = first if start_minus else lo, last if end_minus else hi  # windows read directly: [a, b) ...
        direct = [(a, b)] if first == last else [(a, first), (last, b)]  # ... less the whole units
        parts = halves(u0, u1) if u1 > u0 else []
        parts += [windows(x, y, 1) for x, y in direct if x < y]
        if start_minus:
            parts.append(windows(first - unit, lo, -1))
        if end_minus:
            parts.append(windows(hi, last + unit, -1))
    if len(parts) == 1:
        rows: Any = parts[0].subquery()
    else:
        rows = union_all(*parts).subquery()
    n, s = func.sum(rows.c.n), func.sum(rows.c.s)
    q = select(rows.c.ref, n.label("n"), s.label("s")).group_by(rows.c.ref)
    if len(parts) > 1:  # a client whose windows in the unit all lie outside the range sums to nothing
        q = q.having(n > 0)
    return q.subquery()
