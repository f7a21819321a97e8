"""SQLAlchemy 2.0 models. The schema itself is created only by the Alembic migrations in `migrations/`.

Times are stored as UTC (`UTCDateTime` returns aware datetimes on SQLite and PostgreSQL alike). Secrets are
never stored: an API key is kept as its public prefix and its SHA-256 digest.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ROLE_ADMIN = "admin"
ROLE_USER = "user"

# BIGINT primary keys autoincrement on PostgreSQL; SQLite only autoincrements INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite drops the offset, so it is restored on read)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: dict[Any, Any] = {datetime: UTCDateTime()}


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[str] = mapped_column(String(16), default=ROLE_USER)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    disabled_at: Mapped[datetime | None] = mapped_column(default=None)

    keys: Mapped[list[ApiKey]] = relationship(back_populates="user")


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str | None] = mapped_column(String(100), default=None)
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSON, default=list)
    sample_quota: Mapped[int | None] = mapped_column(BigInteger, default=None)  # None = unlimited
    samples_used: Mapped[int] = mapped_column(BigInteger, default=0)
    # Fixed-window request counter for the per-key rate limit, kept in the database so that every worker
    # process sharing it sees the same count.
    rate_window: Mapped[int] = mapped_column(BigInteger, default=0)
    rate_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    # Per-licensee watermark of the /distill-batch soft labels (service/watermarks): whether it is on now,
    # and its public id, set the first time it is turned on and never cleared (revoked keys stay traceable).
    watermarked: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    watermark_id: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    # Which mode of the watermark bank the key holds: distinct slots give orthogonal marks (no framing).
    watermark_slot: Mapped[int | None] = mapped_column(Integer, default=None, unique=True)

    user: Mapped[User] = relationship(back_populates="keys")


class QueryAudit(Base):
    __tablename__ = "query_audits"
    __table_args__ = (
        Index("ix_query_audits_user_time", "user_id", "created_at"),
        Index("ix_query_audits_key_time", "api_key_id", "created_at"),
        Index("ix_query_audits_client_time", "client_id", "created_at"),
        Index("ix_query_audits_model_time", "model", "created_at"),
        Index("ix_query_audits_endpoint_time", "endpoint", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    endpoint: Mapped[str] = mapped_column(String(32))
    model: Mapped[str | None] = mapped_column(String(128), default=None)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), default=None)
    api_key_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_keys.id", ondelete="SET NULL"), default=None
    )
    client_id: Mapped[str | None] = mapped_column(String(64), default=None)  # salted hash of the address
    n_samples: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float, default=None)
    input_digest: Mapped[str | None] = mapped_column(String(64), default=None)
    watermark_id: Mapped[str | None] = mapped_column(String(64), default=None)  # the mark that served it


class ModelRecord(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    version: Mapped[str] = mapped_column(String(64))
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # public metadata; never key material
    first_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_loaded_at: Mapped[datetime] = mapped_column(default=utcnow)


class SecurityEvent(Base):
    """Admin actions, key creation/revocation, token issue and authentication failures."""

    __tablename__ = "security_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    action: Mapped[str] = mapped_column(String(48), index=True)
    outcome: Mapped[str] = mapped_column(String(16))
    actor_user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), default=None, index=True
    )
    actor_key_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_keys.id", ondelete="SET NULL"), default=None
    )
    client_id: Mapped[str | None] = mapped_column(String(64), default=None)
    target: Mapped[str | None] = mapped_column(String(128), default=None)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


# ------------------------------------------------------------------------------- audit aggregates (0003)
# Minutes are whole minutes since the Unix epoch (INTEGER): small rows, and the same arithmetic on SQLite
# and PostgreSQL. Each aggregate row is keyed by the start minute of its bucket.


class AuditClient(Base):
    """The anonymous client ids seen by /predict, interned: aggregates hold a 4-byte reference."""

    __tablename__ = "audit_clients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    client_id: Mapped[str] = mapped_column(String(64), unique=True)


class UsageMinute(Base):
    """Calls per minute, endpoint, model ('' for none) and status: the timeline's source."""

    __tablename__ = "usage_minutes"

    minute: Mapped[int] = mapped_column(Integer, primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(32), primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    status: Mapped[int] = mapped_column(Integer, primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger)
    samples: Mapped[int] = mapped_column(BigInteger)


class ClientUsage(Base):
    """Anonymous /predict calls per client, status and bucket of SDB_EXTRACTION_WINDOW_S (the watch's window).

    The primary key leads with the client (per-client series, the upsert); the BRIN index on `minute` serves
    time ranges over all clients (rows arrive in time order, so it stays a few pages).
    """

    __tablename__ = "client_usage"
    __table_args__ = (Index("ix_client_usage_minute", "minute", postgresql_using="brin"),)

    client_ref: Mapped[int] = mapped_column(
        ForeignKey("audit_clients.id", ondelete="CASCADE"), primary_key=True
    )
    minute: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[int] = mapped_column(Integer, primary_key=True)
    requests: Mapped[int] = mapped_column(Integer)
    samples: Mapped[int] = mapped_column(BigInteger)


class ClientDay(Base):
    """Per anonymous client and UTC day: answered calls, samples, and the largest window's samples (the
    extraction flag's candidates, found without reading every window)."""

    __tablename__ = "client_days"
    __table_args__ = (Index("ix_client_days_day_peak", "day", "peak_window_samples"),)

    client_ref: Mapped[int] = mapped_column(
        ForeignKey("audit_clients.id", ondelete="CASCADE"), primary_key=True
    )
    day: Mapped[int] = mapped_column(Integer, primary_key=True)  # start minute of the UTC day
    requests: Mapped[int] = mapped_column(BigInteger)
    samples: Mapped[int] = mapped_column(BigInteger)
    peak_window_samples: Mapped[int] = mapped_column(BigInteger)
    # the windows starting in the day's first 12 hours (the clients ranking's half days, crud/reports.py)
    first_half_requests: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    first_half_samples: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))


class UserUsage(Base):
    """/distill-batch calls per user, model, status and hour, rolled up from the per-call rows."""

    __tablename__ = "user_usage"

    minute: Mapped[int] = mapped_column(Integer, primary_key=True)  # start minute of the hour
    user_id: Mapped[int] = mapped_column(BigId, primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    status: Mapped[int] = mapped_column(Integer, primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger)
    samples: Mapped[int] = mapped_column(BigInteger)
    last_at: Mapped[datetime] = mapped_column()


class AuditRollup(Base):
    """How far a rollup of per-call rows has gone (`name` 'distill': query_audits ids up to `last_id`)."""

    __tablename__ = "audit_rollups"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    last_id: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditFlush(Base):
    """One row per audit-writer batch, written in the batch's transaction: after a failed COMMIT the writer
    looks for it to know whether the batch landed (pruned after an hour)."""

    __tablename__ = "audit_flushes"

    token: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class LicenseeImage(Base):
    """A sample of the images a watermarked API key sent to /distill-batch for one model: those with the
    `SDB_LICENSEE_IMAGES` smallest keyed hashes (`rank`; service/watermarks/samples.py), a uniform sample of
    the distinct images sent that the licensee can neither predict nor steer. `sdb trace` probes a suspect
    with them: a student carries its licensee's mark on the images it was taught on far more than on fresh
    ones. Licensee data: read only by a trace, deleted with the key's user."""

    __tablename__ = "licensee_images"
    __table_args__ = (UniqueConstraint("api_key_id", "model", "rank"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(128))
    rank: Mapped[int] = mapped_column(BigInteger)
    image: Mapped[bytes] = mapped_column(LargeBinary)  # float32, C order, the model's input shape
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
