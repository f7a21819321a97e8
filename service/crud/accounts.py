"""Accounts: users, API keys (stored as hashes), the first administrator, and key usability."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.core.security import NewApiKey, api_key_matches, api_key_prefix, looks_like_api_key
from service.crud.events import record_event
from service.db.models import ROLE_ADMIN, ApiKey, User, utcnow
from service.sanitize import clean


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
