"""The `models` table: public metadata of the models each worker loaded (never key material)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import ModelRecord, utcnow


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
