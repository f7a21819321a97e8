"""Administrators' changes, each one write transaction that also records its security event (with the
acting admin and their client): create a user, disable or enable one, issue and revoke API keys, export
audits. Raises the data layer's NotFoundError / ConflictError; the routes map them.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from service.core.security import NewApiKey
from service.crud import accounts, audit_list, events, watermarks
from service.crud.accounts import ConflictError
from service.crud.audit_list import AuditFilter
from service.crud.events import Actor
from service.db.models import ApiKey, QueryAudit, User
from service.db.session import Database


def create_user(db: Database, name: str, role: str, *, actor: Actor, client_id: str | None) -> User:
    with db.write() as s:
        user = accounts.create_user(s, name, role)
        events.record_event(
            s,
            "user.create",
            "ok",
            actor=actor,
            client_id=client_id,
            target=f"user:{user.id}",
            detail={"role": role},
        )
        return user


def set_user_disabled(
    db: Database, user_id: int, disabled: bool, *, actor: Actor, client_id: str | None
) -> User:
    with db.write() as s:
        user = accounts.set_user_disabled(s, accounts.get_user(s, user_id), disabled)
        events.record_event(
            s,
            "user.disable" if disabled else "user.enable",
            "ok",
            actor=actor,
            client_id=client_id,
            target=f"user:{user_id}",
        )
        return user


def issue_key(
    db: Database,
    user_id: int,
    new: NewApiKey,
    *,
    scopes: list[str],
    sample_quota: int | None,
    expires_at: datetime | None,
    name: str | None,
    actor: Actor,
    client_id: str | None,
    watermark_id: Callable[[int, str], str] | None = None,
    bank_size: int = 0,
) -> ApiKey:
    """Store `new` (its prefix and digest, never the secret) as a key of an enabled user; with
    `watermark_id` (key id, prefix -> public id) its /distill-batch watermark is on (WatermarkBankFull when
    the bank of `bank_size` slots is spent)."""
    with db.write() as s:
        user = accounts.get_user(s, user_id)
        if user.disabled:
            raise ConflictError("the user is disabled")
        key = accounts.create_api_key(
            s,
            user,
            prefix=new.prefix,
            digest=new.digest,
            scopes=scopes,
            sample_quota=sample_quota,
            expires_at=expires_at,
            name=name,
        )
        if watermark_id is not None:
            watermarks.set_key_watermark(s, key, True, watermark_id=watermark_id, bank_size=bank_size)
        events.record_event(
            s,
            "key.issue",
            "ok",
            actor=actor,
            client_id=client_id,
            target=f"key:{key.id}",
            detail={
                "user_id": user_id,
                "scopes": scopes,
                "sample_quota": sample_quota,
                "watermarked": watermark_id is not None,
            },
        )
        return key


def revoke_key(db: Database, key_id: int, *, actor: Actor, client_id: str | None) -> ApiKey:
    with db.write() as s:
        key = accounts.revoke_key(s, accounts.get_key(s, key_id))
        events.record_event(s, "key.revoke", "ok", actor=actor, client_id=client_id, target=f"key:{key_id}")
        return key


def export_audits(
    db: Database, f: AuditFilter, limit: int, *, actor: Actor, client_id: str | None
) -> tuple[list[QueryAudit], int]:
    """The audit rows of an export (newest first, at most `limit`) and how many match, the export recorded."""
    with db.write() as s:
        rows, total = audit_list.list_audits(s, f, limit=limit, offset=0)
        events.record_event(
            s,
            "audit.export",
            "ok",
            actor=actor,
            client_id=client_id,
            detail={"rows": len(rows), "total": total},
        )
        return rows, total
