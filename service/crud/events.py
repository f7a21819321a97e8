"""Security events: admin actions and authentication failures, written with cleaned text."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db.models import SecurityEvent
from service.db.session import Database
from service.sanitize import clean

logger = logging.getLogger(__name__)


class Actor(Protocol):
    """Who acted (a `service.crud.principals.Principal`, named here by shape only: principals -> accounts
    -> events must not import back)."""

    @property
    def user_id(self) -> int: ...

    @property
    def key_id(self) -> int: ...


def record_event(
    session: Session,
    action: str,
    outcome: str,
    *,
    actor: Actor | None = None,
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
