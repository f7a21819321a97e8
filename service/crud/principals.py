"""Principal resolution: who a token speaks for, re-checked in the database on every call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, bindparam, select
from sqlalchemy.orm import Session

from service.core.security import TokenClaims
from service.crud.accounts import usable
from service.db.models import ROLE_ADMIN, ApiKey, User, utcnow

WILDCARD_SCOPE = "*"


@dataclass(frozen=True)
class Principal:
    user_id: int
    role: str
    key_id: int
    scopes: frozenset[str]  # the token's scopes that the key (still) holds
    key_prefix: str = ""
    watermark_id: str | None = None  # the key's /distill-batch watermark, when it is on
    watermark_slot: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == ROLE_ADMIN

    def may_use(self, model: str) -> bool:
        return model in self.scopes or WILDCARD_SCOPE in self.scopes


class AuthFailure(Exception):
    """Why a verified token was refused by the database check (a fixed reason code)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def attributed_to(self, claims: TokenClaims) -> tuple[int | None, int | None]:
        """The (user id, key id) that a refused token is attributed to in audits and security events.

        The one rule: a token of an existing key of its own user (revoked, expired, disabled) is attributed
        to them; a token naming an unknown key, or a key of another user, is attributed to no one.
        """
        if self.reason in ("unknown_key", "subject"):
            return None, None
        return claims.user_id, claims.key_id


def granted_scopes(key_scopes: Sequence[str], requested: Sequence[str] | frozenset[str]) -> frozenset[str]:
    """The requested scopes that the key holds (`*` on the key covers every model)."""
    if WILDCARD_SCOPE in key_scopes:
        return frozenset(requested)
    return frozenset(requested) & frozenset(key_scopes)


def unknown_scopes(scopes: Sequence[str] | frozenset[str], served: Sequence[str]) -> list[str]:
    """The scopes that name no served model (`*` always names every model), sorted."""
    return sorted(set(scopes) - set(served) - {WILDCARD_SCOPE})


def unknown_scopes_message(unknown: Sequence[str], served: Sequence[str]) -> str:
    names = ", ".join(repr(n) for n in unknown)
    offered = ", ".join(repr(n) for n in served) or "no model"
    return f"unknown scope {names}: a scope names a served model ({offered}) or is `*` for every model"


_PRINCIPAL = (
    select(
        ApiKey.user_id,
        ApiKey.scopes,
        ApiKey.revoked_at,
        ApiKey.expires_at,
        User.role,
        User.disabled,
        ApiKey.prefix,
        ApiKey.watermarked,
        ApiKey.watermark_id,
        ApiKey.watermark_slot,
    )
    .join(User, ApiKey.user_id == User.id)
    .where(ApiKey.id == bindparam("key_id"))
)


def load_principal(conn: Session | Connection, claims: TokenClaims, now: datetime | None = None) -> Principal:
    """Check the token's key and user in the database (revocation, expiry, disabled user) on every call."""
    row = conn.execute(_PRINCIPAL, {"key_id": claims.key_id}).first()
    if row is None:
        raise AuthFailure("unknown_key")
    user_id, scopes, revoked_at, expires_at, role, disabled, prefix, watermarked, wid, slot = row
    if user_id != claims.user_id:
        raise AuthFailure("subject")
    reason = usable(revoked_at, expires_at, disabled, now or utcnow())
    if reason is not None:
        raise AuthFailure(reason)
    return Principal(
        user_id=user_id,
        role=role,
        key_id=claims.key_id,
        scopes=granted_scopes(scopes, claims.scopes),
        key_prefix=prefix,
        watermark_id=wid if watermarked and slot is not None else None,
        watermark_slot=slot,
    )
