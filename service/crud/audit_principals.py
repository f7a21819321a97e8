"""Who made an audited call, by name: the admin audit filters by user / API key name and the names shown
next to the ids of authenticated audit rows (the rows keep only ids; a renamed key shows its current name)."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.crud.accounts import NotFoundError
from service.db.models import ApiKey, QueryAudit, User


def check_names(session: Session, user_name: str | None, key_name: str | None) -> None:
    """NotFoundError when a filter names no user / no API key: a typo is an error, not an empty page."""
    if user_name is not None and session.scalar(select(User.id).where(User.name == user_name)) is None:
        raise NotFoundError(f"no user named {user_name!r}")
    key = select(ApiKey.id).where(ApiKey.name == key_name).limit(1)
    if key_name is not None and session.scalar(key) is None:
        raise NotFoundError(f"no API key named {key_name!r}")


def principal_names(
    session: Session, rows: Iterable[QueryAudit]
) -> tuple[dict[int, str], dict[int, str | None]]:
    """The user names and API key names of the ids in `rows` (two queries, whatever the page size)."""
    rows = list(rows)
    user_ids = {r.user_id for r in rows if r.user_id is not None}
    key_ids = {r.api_key_id for r in rows if r.api_key_id is not None}
    users: dict[int, str] = {}
    keys: dict[int, str | None] = {}
    if user_ids:
        named_users = session.execute(select(User.id, User.name).where(User.id.in_(user_ids)))
        users = {i: n for i, n in named_users}
    if key_ids:
        named_keys = session.execute(select(ApiKey.id, ApiKey.name).where(ApiKey.id.in_(key_ids)))
        keys = {i: n for i, n in named_keys}
    return users, keys
