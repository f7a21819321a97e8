"""Database operations: users, API keys, security events, the /distill-batch quota transaction, audits,
usage reports, and the non-blocking /predict audit writer.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import Connection, Integer, and_, bindparam, case, cast, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import metrics

# Re-exported: the /predict route and its tests use these through crud.
from service.db.audit_queue import AuditQueue as AuditQueue
from service.db.audit_queue import AuditQueueConfig as AuditQueueConfig
from service.db.audit_queue import AuditRecord as AuditRecord
from service.db.models import (
    ROLE_ADMIN,
    STATUS_RESERVED,
    ApiKey,
    ModelRecord,
    QueryAudit,
    SecurityEvent,
    User,
    utcnow,
)
from service.db.session import Database
from service.security import (
    GENERIC_TOKEN_ERROR,
    NewApiKey,
    TokenClaims,
    api_key_matches,
    api_key_prefix,
    looks_like_api_key,
)

logger = logging.getLogger(__name__)

DISTILL_ENDPOINT = "/distill-batch"
PREDICT_ENDPOINT = "/predict"
WILDCARD_SCOPE = "*"


def _clock() -> float:
    """Wall-clock seconds for the rate-limit window (a seam for tests)."""
    return time.time()


def clean(value: Any, limit: int = 200) -> str:
    """A value made safe for logs and audit rows: no CR/LF or control characters, bounded length."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(value))
    return text[:limit]


def input_digest(x: np.ndarray) -> str:
    """SHA-256 of the float32 inputs (shape included), to recognize repeated queries without storing them."""
    h = hashlib.sha256(str(tuple(x.shape)).encode())
    h.update(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- users


class ConflictError(Exception):
    pass


class NotFoundError(Exception):
    pass


def create_user(session: Session, name: str, role: str) -> User:
    user = User(name=name, role=role)
    session.add(user)
    try:
        session.flush()
    except IntegrityError as exc:
        session.rollback()
        raise ConflictError(f"a user named {clean(name, 100)!r} already exists") from exc
    return user


def get_user(session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFoundError(f"no user with id {user_id}")
    return user


def list_users(session: Session, *, limit: int, offset: int) -> tuple[list[User], int]:
    total = session.scalar(select(func.count()).select_from(User)) or 0
    rows = session.scalars(select(User).order_by(User.id).limit(limit).offset(offset)).all()
    return list(rows), int(total)


def set_user_disabled(session: Session, user: User, disabled: bool) -> User:
    user.disabled = disabled
    user.disabled_at = utcnow() if disabled else None
    session.flush()
    return user


def admin_exists(session: Session) -> bool:
    return session.scalar(select(User.id).where(User.role == ROLE_ADMIN).limit(1)) is not None


# ---------------------------------------------------------------------------------------------- keys


def create_api_key(
    session: Session,
    user: User,
    *,
    prefix: str,
    digest: str,
    scopes: Sequence[str],
    sample_quota: int | None,
    expires_at: datetime | None,
    name: str | None = None,
) -> ApiKey:
    key = ApiKey(
        user_id=user.id,
        name=name,
        prefix=prefix,
        key_hash=digest,
        scopes=sorted(set(scopes)),
        sample_quota=sample_quota,
        samples_used=0,
        rate_window=0,
        rate_count=0,
        expires_at=expires_at,
    )
    session.add(key)
    session.flush()
    return key


def create_first_admin(session: Session, name: str, key: NewApiKey, via: str) -> tuple[User, ApiKey]:
    """The first administrator and its unscoped, unlimited API key (only its hash is stored).
    Raises ConflictError if an administrator exists already or the name is taken."""
    if admin_exists(session):
        raise ConflictError("an administrator already exists; issue further keys with the admin API")
    user = create_user(session, name, ROLE_ADMIN)
    created = create_api_key(
        session,
        user,
        prefix=key.prefix,
        digest=key.digest,
        scopes=[],
        sample_quota=None,
        expires_at=None,
        name="bootstrap",
    )
    record_event(session, "admin.bootstrap", "ok", target=f"key:{created.id}", detail={"via": via})
    return user, created


def get_key(session: Session, key_id: int) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFoundError(f"no API key with id {key_id}")
    return key


def list_keys(session: Session, *, user_id: int | None, limit: int, offset: int) -> tuple[list[ApiKey], int]:
    q = select(ApiKey)
    if user_id is not None:
        q = q.where(ApiKey.user_id == user_id)
    total = session.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = session.scalars(q.order_by(ApiKey.id).limit(limit).offset(offset)).all()
    return list(rows), int(total)


def revoke_key(session: Session, key: ApiKey) -> ApiKey:
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


def find_key_by_secret(session: Session, secret: str) -> ApiKey | None:
    """The key whose digest matches `secret` (constant-time compare), or None."""
    if not looks_like_api_key(secret):
        return None
    candidates = session.scalars(select(ApiKey).where(ApiKey.prefix == api_key_prefix(secret))).all()
    found = None
    for key in candidates:  # compare with every candidate: no early exit on the first match
        if api_key_matches(secret, key.key_hash):
            found = key
    return found


def usable(
    revoked_at: datetime | None, expires_at: datetime | None, disabled: bool, now: datetime
) -> str | None:
    """None if a key may be used now, else a fixed reason code."""
    if revoked_at is not None:
        return "revoked"
    if expires_at is not None and expires_at <= now:
        return "expired_key"
    if disabled:
        return "disabled_user"
    return None


def key_usable(key: ApiKey, user: User, now: datetime) -> str | None:
    return usable(key.revoked_at, key.expires_at, user.disabled, now)


# ---------------------------------------------------------------------------------------------- principals


@dataclass(frozen=True)
class Principal:
    user_id: int
    user_name: str
    role: str
    key_id: int
    scopes: frozenset[str]  # the token's scopes that the key (still) holds

    @property
    def is_admin(self) -> bool:
        return self.role == ROLE_ADMIN

    def may_use(self, model: str) -> bool:
        return model in self.scopes or WILDCARD_SCOPE in self.scopes


class AuthFailure(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def granted_scopes(key_scopes: Sequence[str], requested: Sequence[str] | frozenset[str]) -> frozenset[str]:
    """The requested scopes that the key holds (`*` on the key covers every model)."""
    if WILDCARD_SCOPE in key_scopes:
        return frozenset(requested)
    return frozenset(requested) & frozenset(key_scopes)


_PRINCIPAL = (
    select(
        ApiKey.user_id,
        ApiKey.scopes,
        ApiKey.revoked_at,
        ApiKey.expires_at,
        User.name,
        User.role,
        User.disabled,
    )
    .join(User, ApiKey.user_id == User.id)
    .where(ApiKey.id == bindparam("key_id"))
)


def load_principal(conn: Session | Connection, claims: TokenClaims, now: datetime | None = None) -> Principal:
    """Check the token's key and user in the database (revocation, expiry, disabled user) on every call."""
    row = conn.execute(_PRINCIPAL, {"key_id": claims.key_id}).first()
    if row is None:
        raise AuthFailure("unknown_key")
    user_id, scopes, revoked_at, expires_at, name, role, disabled = row
    if user_id != claims.user_id:
        raise AuthFailure("subject")
    reason = usable(revoked_at, expires_at, disabled, now or utcnow())
    if reason is not None:
        raise AuthFailure(reason)
    return Principal(
        user_id=user_id,
        user_name=name,
        role=role,
        key_id=claims.key_id,
        scopes=granted_scopes(scopes, claims.scopes),
    )


# ---------------------------------------------------------------------------------------------- events


def record_event(
    session: Session,
    action: str,
    outcome: str,
    *,
    actor: Principal | None = None,
    actor_user_id: int | None = None,
    actor_key_id: int | None = None,
    client_id: str | None = None,
    target: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    session.add(
        SecurityEvent(
            action=clean(action, 48),
            outcome=clean(outcome, 16),
            actor_user_id=actor.user_id if actor else actor_user_id,
            actor_key_id=actor.key_id if actor else actor_key_id,
            client_id=client_id,
            target=clean(target, 128) if target is not None else None,
            detail={clean(k, 40): _clean_json(v) for k, v in (detail or {}).items()},
        )
    )


def _clean_json(v: Any) -> Any:
    if v is None or isinstance(v, bool | int | float):
        return v
    if isinstance(v, list | tuple):
        return [_clean_json(x) for x in v][:50]
    return clean(v)


def record_event_safely(db: Database, action: str, outcome: str, **kw: Any) -> None:
    """Best effort: a security event that must not turn a 401 into a 5xx when the database struggles."""
    try:
        with db.write() as s:
            record_event(s, action, outcome, **kw)
    except Exception:
        logger.warning("could not record security event %s", clean(action, 48))


def list_events(
    session: Session, *, action: str | None, user_id: int | None, limit: int, offset: int
) -> tuple[list[SecurityEvent], int]:
    q = select(SecurityEvent)
    if action:
        q = q.where(SecurityEvent.action == action)
    if user_id is not None:
        q = q.where(SecurityEvent.actor_user_id == user_id)
    total = session.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = session.scalars(q.order_by(SecurityEvent.id.desc()).limit(limit).offset(offset)).all()
    return list(rows), int(total)


# ---------------------------------------------------------------------------------------------- distill


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

    @property
    def remaining(self) -> int | None:
        return None if self.quota is None else max(0, self.quota - self.used)


@dataclass(frozen=True)
class DistillDenied(Exception):
    status: int
    error: str
    message: str
    reason: str
    retry_after: int | None = None
    quota: int | None = None
    used: int | None = None


# The hot path of /distill-batch uses prebuilt Core statements on a plain Connection: the same SQL as the
# ORM would emit, at about half the Python cost per call.
_INSERT_AUDIT = insert(QueryAudit).returning(QueryAudit.id)
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


def _audit(
    conn: Connection,
    *,
    status: int,
    model: str | None,
    n: int,
    client: str | None,
    digest: str | None,
    user_id: int | None = None,
    key_id: int | None = None,
    latency_ms: float | None = None,
) -> int:
    audit_id = conn.execute(
        _INSERT_AUDIT,
        {
            "created_at": utcnow(),
            "endpoint": DISTILL_ENDPOINT,
            "model": clean(model, 128) if model is not None else None,
            "user_id": user_id,
            "api_key_id": key_id,
            "client_id": client,
            "n_samples": n,
            "status": status,
            "latency_ms": latency_ms,
            "input_digest": digest,
        },
    ).scalar_one()
    return int(audit_id)


def audit_distill_rejection(
    db: Database,
    *,
    status: int,
    model: str | None,
    n_samples: int,
    client_id: str | None,
    digest: str | None = None,
    user_id: int | None = None,
    key_id: int | None = None,
    latency_ms: float | None = None,
) -> None:
    """Record a /distill-batch call refused before any quota was touched (401, 404, 422...)."""
    with db.write_connection() as conn:
        _audit(
            conn,
            status=status,
            model=model,
            n=n_samples,
            client=client_id,
            digest=digest,
            user_id=user_id,
            key_id=key_id,
            latency_ms=latency_ms,
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
) -> DistillGrant:
    """One write transaction: authorize (DB), count the request against the per-key rate, consume the
    quota, and write the audit row. A refusal is audited and committed too, then raised as DistillDenied.
    The quota is consumed by a conditional UPDATE (`used + n <= quota`) so that concurrent calls can never
    overspend it, on PostgreSQL (row lock, re-checked predicate) and on SQLite (BEGIN IMMEDIATE).
    """
    t = _clock() if now is None else now
    with db.write_connection() as conn:
        result = _reserve(conn, claims, model, n_samples, client_id, digest, rate_per_minute, t, started)
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
) -> DistillGrant | DistillDenied:
    now_dt = datetime.fromtimestamp(t, UTC)

    def refuse(principal: Principal | None, denied: DistillDenied) -> DistillDenied:
        _audit(
            conn,
            status=denied.status,
            model=model,
            n=0,
            client=client_id,
            digest=digest,
            user_id=principal.user_id if principal else None,
            key_id=principal.key_id if principal else None,
            latency_ms=None if started is None else (time.perf_counter() - started) * 1000,
        )
        return denied

    try:
        principal = load_principal(conn, claims, now_dt)
    except AuthFailure as exc:
        # A token of an existing key of its own user (revoked, expired, disabled) is attributed to them.
        known = exc.reason not in ("unknown_key", "subject")
        owner = Principal(claims.user_id, "", "", claims.key_id, frozenset()) if known else None
        return refuse(owner, DistillDenied(401, "invalid_token", GENERIC_TOKEN_ERROR, exc.reason))
    if not principal.may_use(model):
        message = f"this key may not use model {model!r}"
        return refuse(principal, DistillDenied(403, "insufficient_scope", message, "scope"))
    rate_remaining: int | None = None
    if rate_per_minute > 0:
        window = int(t // 60)
        count = conn.execute(
            _RATE, {"key_id": principal.key_id, "window": window, "limit": rate_per_minute}
        ).scalar_one_or_none()
        if count is None:
            retry = max(1, math.ceil((window + 1) * 60 - t))
            message = f"more than {rate_per_minute} requests a minute on this key"
            return refuse(principal, DistillDenied(429, "rate_limited", message, "rate", retry_after=retry))
        rate_remaining = max(0, rate_per_minute - int(count))
    row = conn.execute(_CONSUME, {"key_id": principal.key_id, "n": n_samples, "now": now_dt}).first()
    if row is None:
        used, quota = conn.execute(_QUOTA, {"key_id": principal.key_id}).one()
        left = max(0, (quota or 0) - used)
        message = f"sample quota exhausted: {n_samples} requested, {left} of {quota} remaining"
        return refuse(
            principal, DistillDenied(429, "quota_exceeded", message, "quota", quota=quota, used=int(used))
        )
    audit_id = _audit(
        conn,
        status=STATUS_RESERVED,
        model=model,
        n=n_samples,
        client=client_id,
        digest=digest,
        user_id=principal.user_id,
        key_id=principal.key_id,
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


STATUS_RELEASED = 504  # a reservation never confirmed (database failed at the confirm): samples given back


def release_stale_reservations(db: Database, older_than_s: float, now: float | None = None) -> int:
    """Close /distill-batch reservations left unconfirmed (status 102) for longer than `older_than_s`,
    e.g. when the database failed while the call confirmed: no answer was sent, so the samples go back.
    Returns how many were released."""
    cutoff = datetime.fromtimestamp((_clock() if now is None else now) - older_than_s, UTC)
    released = 0
    with db.write_connection() as conn:
        stale = conn.execute(
            select(QueryAudit.id, QueryAudit.api_key_id, QueryAudit.n_samples).where(
                QueryAudit.status == STATUS_RESERVED,
                QueryAudit.endpoint == DISTILL_ENDPOINT,
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
        logger.warning("released %d stale /distill-batch reservations (samples given back)", released)
    return released


# ---------------------------------------------------------------------------------------------- audits


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


# ---------------------------------------------------------------------------------------------- models


def sync_models(session: Session, infos: list[dict[str, Any]]) -> None:
    """Record the loaded models' public metadata (never key material) in the `models` table."""
    now = utcnow()
    for info in infos:
        name = str(info["name"])
        rec = session.scalar(select(ModelRecord).where(ModelRecord.name == name))
        if rec is None:
            session.add(ModelRecord(name=name, version=str(info.get("version", "")), info=info))
        else:
            rec.version = str(info.get("version", ""))
            rec.info = info
            rec.last_loaded_at = now
    session.flush()


def list_model_records(session: Session) -> list[ModelRecord]:
    return list(session.scalars(select(ModelRecord).order_by(ModelRecord.name)))


# ------------------------------------------------------------------------------------- /predict audits


def record_predict_audit(
    state: Any,
    *,
    model: str | None,
    client_id: str | None,
    n_samples: int,
    status: int,
    latency_ms: float | None,
    input_digest: str | None = None,
) -> None:
    """Queue one /predict audit row; never blocks, never raises. `state` is `request.app.state`."""
    queue: AuditQueue | None = getattr(state, "audit_queue", None)
    if queue is None:
        metrics.record_audit_dropped()
        return
    queue.submit(
        AuditRecord(
            endpoint=PREDICT_ENDPOINT,
            model=model,
            client_id=client_id,
            n_samples=int(n_samples),
            status=int(status),
            latency_ms=latency_ms,
            input_digest=input_digest,
            created_at=utcnow(),
        )
    )
