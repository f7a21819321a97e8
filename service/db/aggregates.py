"""The /predict aggregates, written by the audit queue: one transaction per batch of recorded calls.

Per batch: an `audit_flushes` marker (so a batch whose COMMIT answer was lost is never applied twice), the
per-request rows the policy keeps (on / sampled / off), and upsert-increments of `usage_minutes` (per minute,
endpoint, model, status), `client_usage` (per anonymous client, window and status) and `client_days` (per
client and UTC day, with the largest window). Keys are sorted within each statement so that two processes
upserting the same rows take their locks in the same order (no deadlock). The same statements run on SQLite
(3.35+) and PostgreSQL: INSERT ... ON CONFLICT DO UPDATE.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

from sqlalchemy import Connection, Table, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite

from service.db.models import AuditClient, AuditFlush, ClientDay, ClientUsage, QueryAudit, UsageMinute, utcnow

MINUTES_PER_DAY = 1440
HALF_DAY = MINUTES_PER_DAY // 2  # client_days also sums the windows starting in a day's first half
OK = 200
RowPolicy = Literal["on", "sampled", "off"]


class Recorded(Protocol):
    """One recorded call (service.db.audit_queue.AuditRecord)."""

    @property
    def endpoint(self) -> str: ...
    @property
    def model(self) -> str | None: ...
    @property
    def client_id(self) -> str | None: ...
    @property
    def n_samples(self) -> int: ...
    @property
    def status(self) -> int: ...
    @property
    def latency_ms(self) -> float | None: ...
    @property
    def input_digest(self) -> str | None: ...
    @property
    def created_at(self) -> datetime: ...


@dataclass
class AggregateConfig:
    window_min: int = 60  # the client_usage grain: SDB_EXTRACTION_WINDOW_S in minutes
    rows: RowPolicy = "sampled"
    sample_rate: float = 0.01
    max_cached_clients: int = 200_000
    rng: random.Random = field(default_factory=random.Random)


def minute_of(t: datetime) -> int:
    return int(t.timestamp()) // 60


def upsert(conn: Connection, table: Any, keys: Sequence[str]) -> Any:
    """INSERT ... ON CONFLICT (keys) for the connection's dialect (values and set_ are added by callers)."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def greatest(conn: Connection, a: Any, b: Any) -> Any:
    return func.greatest(a, b) if conn.dialect.name == "postgresql" else func.max(a, b)


def increment(
    conn: Connection,
    table: Table,
    keys: Sequence[str],
    rows: list[dict[str, Any]],
    add: Iterable[str],
    peak: Iterable[str] = (),
    returning: Sequence[str] = (),
) -> list[Any]:
    """Upsert `rows` (unique keys), adding the `add` columns and keeping the max of the `peak` columns."""
    if not rows:
        return []
    rows = sorted(rows, key=lambda r: tuple(r[k] for k in keys))
    ins = upsert(conn, table, keys).values(rows)
    set_: dict[str, Any] = {c: table.c[c] + ins.excluded[c] for c in add}
    set_.update({c: greatest(conn, table.c[c], ins.excluded[c]) for c in peak})
    stmt = ins.on_conflict_do_update(index_elements=list(keys), set_=set_)
    if returning:
        return list(conn.execute(stmt.returning(*(table.c[c] for c in returning))))
    conn.execute(stmt)
    return []


class ClientRefs:
    """client id -> audit_clients.id, cached in the process (a client is interned once)."""

    def __init__(self, max_cached: int) -> None:
        self.max_cached = max_cached
        self._ids: dict[str, int] = {}

    def resolve(self, conn: Connection, clients: set[str]) -> dict[str, int]:
        missing = sorted(c for c in clients if c not in self._ids)
        if missing:
            if len(self._ids) + len(missing) > self.max_cached:
                self._ids.clear()
            table = AuditClient.__table__
            conn.execute(
                upsert(conn, table, ["client_id"])
                .values([{"client_id": c} for c in missing])
                .on_conflict_do_nothing(index_elements=["client_id"])
            )
            found = conn.execute(
                select(AuditClient.client_id, AuditClient.id).where(AuditClient.client_id.in_(missing))
            )
            self._ids.update({c: int(i) for c, i in found})
        return {c: self._ids[c] for c in clients}


class AggregateWriter:
    """Applies one batch of recorded /predict calls (see the module docstring)."""

    def __init__(self, config: AggregateConfig | None = None) -> None:
        self.cfg = config or AggregateConfig()
        self.refs = ClientRefs(self.cfg.max_cached_clients)

    def keep_row(self, r: Recorded) -> bool:
        if self.cfg.rows == "on":
            return True
        if self.cfg.rows == "off":
            return False
        return self.cfg.rng.random() < self.cfg.sample_rate

    def write(self, conn: Connection, batch: Sequence[Recorded], token: str) -> None:
        conn.execute(insert(AuditFlush), {"token": token, "created_at": utcnow()})
        rows = [r for r in batch if self.keep_row(r)]
        if rows:
            conn.execute(insert(QueryAudit), [_row(r) for r in rows])
        self.apply(conn, batch)

    def apply(self, conn: Connection, batch: Sequence[Recorded]) -> None:
        minutes: dict[tuple[int, str, str, int], list[int]] = {}
        for r in batch:
            m = minutes.setdefault((minute_of(r.created_at), r.endpoint, r.model or "", r.status), [0, 0])
            m[0] += 1
            m[1] += r.n_samples
        increment(
            conn,
            UsageMinute.__table__,  # type: ignore[arg-type]
            ("minute", "endpoint", "model", "status"),
            [
                {
                    "minute": k[0],
                    "endpoint": k[1],
                    "model": k[2],
                    "status": k[3],
                    "requests": v[0],
                    "samples": v[1],
                }
                for k, v in minutes.items()
            ],
            add=("requests", "samples"),
        )
        anonymous = [r for r in batch if r.client_id is not None]
        if not anonymous:
            return
        refs = self.refs.resolve(conn, {r.client_id for r in anonymous if r.client_id is not None})
        w = self.cfg.window_min
        per_client: dict[tuple[int, int, int], list[int]] = {}
        for r in anonymous:
            assert r.client_id is not None
            key = (refs[r.client_id], minute_of(r.created_at) // w * w, r.status)
            c = per_client.setdefault(key, [0, 0])
            c[0] += 1
            c[1] += r.n_samples
        windows = increment(
            conn,
            ClientUsage.__table__,  # type: ignore[arg-type]
            ("client_ref", "minute", "status"),
            [
                {"client_ref": k[0], "minute": k[1], "status": k[2], "requests": v[0], "samples": v[1]}
                for k, v in per_client.items()
            ],
            add=("requests", "samples"),
            returning=("client_ref", "minute", "status", "samples"),
        )
        days: dict[tuple[int, int], list[int]] = {}
        for ref, minute, status, total in windows:
            if status != OK:
                continue
            n, s = per_client[(ref, minute, status)]
            d = days.setdefault((ref, minute // MINUTES_PER_DAY * MINUTES_PER_DAY), [0, 0, 0, 0, 0])
            d[0] += n
            d[1] += s
            d[2] = max(d[2], int(total))  # the window's total after this batch: the day's peak so far
            if minute % MINUTES_PER_DAY < HALF_DAY:
                d[3] += n
                d[4] += s
        increment(
            conn,
            ClientDay.__table__,  # type: ignore[arg-type]
            ("client_ref", "day"),
            [
                {
                    "client_ref": k[0],
                    "day": k[1],
                    "requests": v[0],
                    "samples": v[1],
                    "peak_window_samples": v[2],
                    "first_half_requests": v[3],
                    "first_half_samples": v[4],
                }
                for k, v in days.items()
            ],
            add=("requests", "samples", "first_half_requests", "first_half_samples"),
            peak=("peak_window_samples",),
        )


def new_token() -> str:
    return uuid.uuid4().hex


def _row(r: Recorded) -> dict[str, Any]:
    return {
        "endpoint": r.endpoint,
        "model": r.model,
        "client_id": r.client_id,
        "n_samples": r.n_samples,
        "status": r.status,
        "latency_ms": r.latency_ms,
        "input_digest": r.input_digest,
        "created_at": r.created_at,
    }
