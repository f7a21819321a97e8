"""Listing the per-call audit rows: a filter, newest first, counted up to a cap (the count's time is bounded
by the cap, not by the table; `Total.capped` says when more rows match)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from service.crud.audit_principals import check_names
from service.db.models import ApiKey, QueryAudit, User


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
    user_name: str | None = None
    key_name: str | None = None  # every key of that name (names are labels, not unique)

    def apply(self, q: Any) -> Any:
        conds = []
        if self.user_id is not None:
            conds.append(QueryAudit.user_id == self.user_id)
        if self.user_name is not None:
            conds.append(QueryAudit.user_id.in_(select(User.id).where(User.name == self.user_name)))
        if self.key_name is not None:
            conds.append(QueryAudit.api_key_id.in_(select(ApiKey.id).where(ApiKey.name == self.key_name)))
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


COUNT_CAP = 10_000  # audit listings count at most this many rows past the page (total_capped says so)


class Total(int):
    """A row count that may be capped: `capped` when more rows match than were counted."""

    capped: bool = False

    @classmethod
    def of(cls, n: int, capped: bool) -> Total:
        t = cls(n)
        t.capped = capped
        return t


def capped_count(session: Session, q: Any, cap: int) -> Total:
    """Rows of `q`, counting at most cap + 1: the time is bounded by the cap, not by the table."""
    n = int(session.scalar(select(func.count()).select_from(q.limit(cap + 1).subquery())) or 0)
    return Total.of(min(n, cap), n > cap)


def list_audits(
    session: Session, f: AuditFilter, *, limit: int, offset: int
) -> tuple[list[QueryAudit], Total]:
    """A page of audit rows, newest first, and their count up to offset + limit + COUNT_CAP.
    NotFoundError when the filter names a user or key that does not exist."""
    check_names(session, f.user_name, f.key_name)
    q = f.apply(select(QueryAudit))
    total = capped_count(session, f.apply(select(QueryAudit.id)), offset + limit + COUNT_CAP)
    rows = session.scalars(q.order_by(QueryAudit.id.desc()).limit(limit).offset(offset)).all()
    return list(rows), total
