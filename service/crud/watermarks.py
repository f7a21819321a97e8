"""Watermarks in the database: every key's watermark ever issued, and turning a key's mark on or off.

A key's watermark is given once, the first time it is turned on: its public id (a one-way function of the
watermark secret and the key) and its slot, the next free mode of the bank (distinct slots give orthogonal
marks, so one licensee's leak never points at another). Both stay on the row for good, revoked or not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db.models import ApiKey, User


class WatermarkBankFull(Exception):
    """Every mode of the watermark bank is held by a key: a further mark would share one (framing)."""


@dataclass(frozen=True)
class IssuedWatermark:
    """One API key whose soft labels were (or are) watermarked: what a trace tests and reports."""

    key_id: int
    prefix: str
    watermark_id: str
    slot: int
    watermarked: bool  # on now
    key_name: str | None
    user_id: int
    user_name: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


def issued_watermarks(session: Session, limit: int | None = None) -> list[IssuedWatermark]:
    """Every key that was ever given a watermark (revoked and expired keys included), by key id;
    `limit`: the newest `limit` only (the start-up check)."""
    q = (
        select(
            ApiKey.id,
            ApiKey.prefix,
            ApiKey.watermark_id,
            ApiKey.watermark_slot,
            ApiKey.watermarked,
            ApiKey.name,
            ApiKey.user_id,
            User.name,
            ApiKey.created_at,
            ApiKey.expires_at,
            ApiKey.revoked_at,
        )
        .join(User, ApiKey.user_id == User.id)
        .where(ApiKey.watermark_id.is_not(None), ApiKey.watermark_slot.is_not(None))
    )
    if limit is not None:
        q = q.order_by(ApiKey.id.desc()).limit(limit)
    rows = [IssuedWatermark(*row) for row in session.execute(q).all()]  # type: ignore[arg-type]
    return sorted(rows, key=lambda r: r.key_id)


def set_key_watermark(
    session: Session,
    key: ApiKey,
    enabled: bool,
    *,
    watermark_id: Callable[[int, str], str],
    bank_size: int,
) -> ApiKey:
    """Turn the key's mark on or off; the first time on, give it its id and the next free slot.
    Raises WatermarkBankFull when no slot is left."""
    if enabled and key.watermark_id is None:
        last = session.scalar(select(func.max(ApiKey.watermark_slot)))
        slot = 0 if last is None else int(last) + 1
        if slot >= bank_size:
            raise WatermarkBankFull(
                f"all {bank_size} watermarks of the bank are issued: a further one would share a mode "
                "with an issued key (issue this key without a watermark, or widen the bank)"
            )
        key.watermark_slot = slot
        key.watermark_id = watermark_id(key.id, key.prefix)
    key.watermarked = enabled
    session.flush()
    return key
