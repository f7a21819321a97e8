"""Audit rows: every audit status code, the input digest, and the writers of /predict and refused calls."""

from __future__ import annotations

import hashlib

import numpy as np
from sqlalchemy import Connection, insert

from service.db.audit_queue import AuditRecord
from service.db.models import QueryAudit, utcnow
from service.db.session import Database
from service.sanitize import clean

DISTILL_ENDPOINT = "/distill-batch"
PREDICT_ENDPOINT = "/predict"

# Audit status codes. Answered and refused calls store the HTTP status they got; three codes are the
# audit table's own.
STATUS_RESERVED = 102  # a keyed call (/distill-batch) holds its samples and awaits its answer
STATUS_CANCELLED = 499  # abandoned (client gone, deadline, shutdown) after its reservation: samples back
STATUS_RELEASED = 504  # never confirmed (database failed at the confirm), released by the sweep: samples back
# Refusals decided inside the quota transaction, by reason (the route answers the same statuses).
REFUSAL_STATUS = {"token": 401, "scope": 403, "rate": 429, "quota": 429}


def input_digest(x: np.ndarray) -> str:
    """SHA-256 of the float32 inputs (shape included), to recognize repeated queries without storing them."""
    h = hashlib.sha256(str(tuple(x.shape)).encode())
    h.update(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    return h.hexdigest()


# The hot path of /distill-batch uses a prebuilt Core statement on a plain Connection: the same SQL as the
# ORM would emit, at about half the Python cost per call.
_INSERT_AUDIT = insert(QueryAudit).returning(QueryAudit.id)


def insert_distill_audit(
    conn: Connection,
    *,
    status: int,
    model: str | None,
    n: int,
    endpoint: str = DISTILL_ENDPOINT,
    client: str | None,
    digest: str | None,
    user_id: int | None = None,
    key_id: int | None = None,
    latency_ms: float | None = None,
    watermark_id: str | None = None,
) -> int:
    audit_id = conn.execute(
        _INSERT_AUDIT,
        {
            "created_at": utcnow(),
            "endpoint": endpoint,
            "model": clean(model, 128) if model is not None else None,
            "user_id": user_id,
            "api_key_id": key_id,
            "client_id": client,
            "n_samples": n,
            "status": status,
            "latency_ms": latency_ms,
            "input_digest": digest,
            "watermark_id": watermark_id,
        },
    ).scalar_one()
    return int(audit_id)


def audit_distill_rejection(
    db: Database,
    *,
    status: int,
    model: str | None,
    client_id: str | None,
    user_id: int | None = None,
    key_id: int | None = None,
    latency_ms: float | None = None,
    endpoint: str = DISTILL_ENDPOINT,
) -> None:
    """Record a keyed call (/distill-batch) refused before any quota was touched (401, 404, 422...)."""
    with db.write_connection() as conn:
        insert_distill_audit(
            conn,
            endpoint=endpoint,
            status=status,
            model=model,
            n=0,
            client=client_id,
            digest=None,
            user_id=user_id,
            key_id=key_id,
            latency_ms=latency_ms,
        )


def predict_audit(
    *,
    model: str | None,
    client_id: str | None,
    n_samples: int,
    status: int,
    latency_ms: float | None,
    input_digest: str | None = None,
) -> AuditRecord:
    """One /predict audit row, for the audit queue (its writer thread stores it)."""
    return AuditRecord(
        endpoint=PREDICT_ENDPOINT,
        model=model,
        client_id=client_id,
        n_samples=int(n_samples),
        status=int(status),
        latency_ms=latency_ms,
        input_digest=input_digest,
        created_at=utcnow(),
    )
