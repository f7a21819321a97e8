"""The quota transactions of a keyed call (/distill-batch): reserve (authorize, rate, quota, audit), finalize,
release stale. `service.crud.keyed_calls.KeyedCall` runs them for a route."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, bindparam, case, or_, select, update

from service.core.security import TokenClaims
from service.crud.audits import (
    DISTILL_ENDPOINT,
    REFUSAL_STATUS,
    STATUS_RELEASED,
    STATUS_RESERVED,
    insert_distill_audit,
)
from service.crud.principals import AuthFailure, load_principal
from service.db.models import ApiKey, QueryAudit
from service.db.session import Database

logger = logging.getLogger(__name__)


def _clock() -> float:
    """Wall-clock seconds for the rate-limit window (a seam for tests)."""
    return time.time()


@dataclass(frozen=True)
class DistillGrant:
    audit_id: int
    user_id: int
    key_id: int
    n_samples: int
    quota: int | None
    used: int
    rate_limit: int
    rate_remaining: int | None
    key_prefix: str = ""
    watermark_id: str | None = None  # the key's mark serves this call (recorded on its audit row)
    watermark_slot: int | None = None


@dataclass(frozen=True)
class DistillDenied(Exception):
    """A refusal decided in the transaction. `reason`: token, scope, rate or quota (REFUSAL_STATUS)."""

    reason: str
    message: str
    auth_reason: str | None = None  # why a token was refused (AuthFailure.reason)
    retry_after: int | None = None
    quota: int | None = None
    used: int | None = None


_RATE = (
    update(ApiKey)
    .where(
        ApiKey.id == bindparam("key_id"),
        or_(ApiKey.rate_window != bindparam("window"), ApiKey.rate_count < bindparam("limit")),
    )
    .values(
        rate_count=case((ApiKey.rate_window == bindparam("window"), ApiKey.rate_count + 1), else_=1),
        rate_window=bindparam("window"),
    )
    .returning(ApiKey.rate_count)
)
_CONSUME = (
    update(ApiKey)
    .where(
        ApiKey.id == bindparam("key_id"),
        or_(ApiKey.sample_quota.is_(None), ApiKey.samples_used + bindparam("n") <= ApiKey.sample_quota),
    )
    .values(samples_used=ApiKey.samples_used + bindparam("n"), last_used_at=bindparam("now"))
    .returning(ApiKey.samples_used, ApiKey.sample_quota)
)
_QUOTA = select(ApiKey.samples_used, ApiKey.sample_quota).where(ApiKey.id == bindparam("key_id"))
_CONFIRM = (
    update(QueryAudit)
    .where(QueryAudit.id == bindparam("audit_id"), QueryAudit.status == STATUS_RESERVED)
    .values(status=bindparam("status"), latency_ms=bindparam("latency_ms"))
)
_REFUND = (
    update(ApiKey)
    .where(ApiKey.id == bindparam("key_id"))
    .values(samples_used=ApiKey.samples_used - bindparam("n"))
)


def reserve_distill(
    db: Database,
    claims: TokenClaims,
    *,
    model: str,
    n_samples: int,
    client_id: str | None,
    digest: str | None,
    rate_per_minute: int,
    now: float | None = None,
    started: float | None = None,
    watermark: bool = True,
    endpoint: str = DISTILL_ENDPOINT,
) -> DistillGrant:
    """One write transaction: authorize (DB), count the request against the per-key rate, consume the
    quota, and write the audit row (with the key's watermark id when its mark is on and `watermark`: the
    model allows marks). A refusal is audited and committed too, then raised as DistillDenied.
    The quota is consumed by a conditional UPDATE (`used + n <= quota`) so that concurrent calls can never
    overspend it, on PostgreSQL (row lock, re-checked predicate) and on SQLite (BEGIN IMMEDIATE).
    """
    t = _clock() if now is None else now
    with db.write_connection() as conn:
        result = _reserve(
            conn,
            claims,
            model,
            n_samples,
            client_id,
            digest,
            rate_per_minute,
            t,
            started,
            watermark,
            endpoint,
        )
    if isinstance(result, DistillDenied):
        raise result
    return result


def _reserve(
    conn: Connection,
    claims: TokenClaims,
    model: str,
    n_samples: int,
    client_id: str | None,
    digest: str | None,
    rate_per_minute: int,
    t: float,
    started: float | None,
    watermark: bool,
    endpoint: str,
) -> DistillGrant | DistillDenied:
    now_dt = datetime.fromtimestamp(t, UTC)

    def refuse(owner: tuple[int | None, int | None], denied: DistillDenied) -> DistillDenied:
        insert_distill_audit(
            conn,
            endpoint=endpoint,
            status=REFUSAL_STATUS[denied.reason],
            model=model,
            n=0,
            client=client_id,
            digest=digest,
            user_id=owner[0],
            key_id=owner[1],
            latency_ms=None if started is None else (time.perf_counter() - started) * 1000,
        )
        return denied

    try:
        principal = load_principal(conn, claims, now_dt)
    except AuthFailure as exc:
        return refuse(
            exc.attributed_to(claims), DistillDenied("token", "invalid token", auth_reason=exc.reason)
        )
    owner = (principal.user_id, principal.key_id)
    if not principal.may_use(model):
        return refuse(owner, DistillDenied("scope", f"this key may not use model {model!r}"))
    rate_remaining: int | None = None
    if rate_per_minute > 0:
        window = int(t // 60)
        count = conn.execute(
            _RATE, {"key_id": principal.key_id, "window": window, "limit": rate_per_minute}
        ).scalar_one_or_none()
        if count is None:
            retry = max(1, math.ceil((window + 1) * 60 - t))
            message = f"more than {rate_per_minute} requests a minute on this key"
            return refuse(owner, DistillDenied("rate", message, retry_after=retry))
        rate_remaining = max(0, rate_per_minute - int(count))
    row = conn.execute(_CONSUME, {"key_id": principal.key_id, "n": n_samples, "now": now_dt}).first()
    if row is None:
        used, quota = conn.execute(_QUOTA, {"key_id": principal.key_id}).one()
        left = max(0, (quota or 0) - used)
        message = (
            f"sample quota exhausted: {n_samples} requested, {left} of {quota} remaining; the quota is a "
            "total for the key's life and never resets: ask an administrator for a larger quota or a new key"
        )
        return refuse(owner, DistillDenied("quota", message, quota=quota, used=int(used)))
    wid = principal.watermark_id if watermark else None
    audit_id = insert_distill_audit(
        conn,
        endpoint=endpoint,
        status=STATUS_RESERVED,
        model=model,
        n=n_samples,
        client=client_id,
        digest=digest,
        user_id=principal.user_id,
        key_id=principal.key_id,
        watermark_id=wid,
    )
    return DistillGrant(
        audit_id=audit_id,
        user_id=principal.user_id,
        key_id=principal.key_id,
        n_samples=n_samples,
        quota=row[1],
        used=int(row[0]),
        rate_limit=rate_per_minute,
        rate_remaining=rate_remaining,
        key_prefix=principal.key_prefix,
        watermark_id=wid,
        watermark_slot=principal.watermark_slot,
    )


class ReservationReleased(Exception):
    """The call's reservation was released by `release_stale_reservations` before it was confirmed."""


def finalize_distill(db: Database, grant: DistillGrant, *, status: int, latency_ms: float) -> None:
    """Confirm the reserved call (status 200), or record its failure and give the samples back.

    Raises ReservationReleased (nothing confirmed, nothing charged) if the sweep of stale reservations
    already closed the row, so that the samples are never given back twice nor answered uncharged.
    """
    with db.write_connection() as conn:
        confirmed = conn.execute(
            _CONFIRM, {"audit_id": grant.audit_id, "status": status, "latency_ms": latency_ms}
        ).rowcount
        if confirmed and status >= 400:
            conn.execute(_REFUND, {"key_id": grant.key_id, "n": grant.n_samples})
    if not confirmed and status < 400:
        raise ReservationReleased(f"reservation {grant.audit_id} was released before it was confirmed")


def release_stale_reservations(db: Database, older_than_s: float, now: float | None = None) -> int:
    """Close keyed calls' reservations (STATUS_RESERVED, whatever the endpoint) left unconfirmed for longer
    than `older_than_s`, e.g. when the database failed while the call confirmed: no answer was sent, so the
    samples go back. Returns how many were released."""
    cutoff = datetime.fromtimestamp((_clock() if now is None else now) - older_than_s, UTC)
    released = 0
    with db.write_connection() as conn:
        stale = conn.execute(
            select(QueryAudit.id, QueryAudit.api_key_id, QueryAudit.n_samples).where(
                QueryAudit.status == STATUS_RESERVED,
                QueryAudit.created_at < cutoff,
            )
        ).all()
        for audit_id, key_id, n in stale:
            closed = conn.execute(
                _CONFIRM, {"audit_id": audit_id, "status": STATUS_RELEASED, "latency_ms": None}
            ).rowcount
            if closed and key_id is not None:
                conn.execute(_REFUND, {"key_id": key_id, "n": n})
                released += 1
    if released:
        logger.warning("released %d stale keyed-call reservations (samples given back)", released)
    return released
