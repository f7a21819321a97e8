"""audit aggregates: usage_minutes, client_usage, client_days, user_usage, audit_clients, audit_rollups,
audit_flushes; /predict aggregates backfilled from the existing per-request rows

The /distill-batch aggregates (user_usage and the /distill-batch rows of usage_minutes) are not written here:
the service's rollup (service/crud/rollup.py) reads the per-call rows from id 0 in batches at its first runs,
the same code that keeps them current afterwards. The grain of client_usage is SDB_EXTRACTION_WINDOW_S
(default 3600 s) as set when this migration runs.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05 22:00:00
"""

import os
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _minute_sql(dialect: str) -> str:
    if dialect == "sqlite":
        return "(CAST(strftime('%s', q.created_at) AS INTEGER) / 60)"
    return "CAST(floor(extract(epoch from q.created_at) / 60) AS INTEGER)"


def upgrade() -> None:
    op.create_table(
        "audit_clients",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_clients")),
        sa.UniqueConstraint("client_id", name=op.f("uq_audit_clients_client_id")),
    )
    op.create_table(
        "usage_minutes",
        sa.Column("minute", sa.Integer(), nullable=False),
        sa.Column("endpoint", sa.String(length=32), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("samples", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("minute", "endpoint", "model", "status", name=op.f("pk_usage_minutes")),
    )
    op.create_table(
        "client_usage",
        sa.Column("client_ref", sa.Integer(), nullable=False),
        sa.Column("minute", sa.Integer(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("samples", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["client_ref"], ["audit_clients.id"], name=op.f("fk_client_usage_client_ref_audit_clients"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("client_ref", "minute", "status", name=op.f("pk_client_usage")),
    )
    op.create_index("ix_client_usage_minute", "client_usage", ["minute"], postgresql_using="brin")
    op.create_table(
        "client_days",
        sa.Column("client_ref", sa.Integer(), nullable=False),
        sa.Column("day", sa.Integer(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("samples", sa.BigInteger(), nullable=False),
        sa.Column("peak_window_samples", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["client_ref"], ["audit_clients.id"], name=op.f("fk_client_days_client_ref_audit_clients"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("client_ref", "day", name=op.f("pk_client_days")),
    )
    op.create_index("ix_client_days_day_peak", "client_days", ["day", "peak_window_samples"])
    op.create_table(
        "user_usage",
        sa.Column("minute", sa.Integer(), nullable=False),
        sa.Column("user_id", BigId, nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("samples", sa.BigInteger(), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("minute", "user_id", "model", "status", name=op.f("pk_user_usage")),
    )
    op.create_table(
        "audit_rollups",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_audit_rollups")),
    )
    op.create_table(
        "audit_flushes",
        sa.Column("token", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("token", name=op.f("pk_audit_flushes")),
    )
    op.create_index(op.f("ix_audit_flushes_created_at"), "audit_flushes", ["created_at"])
    _backfill()


def _backfill() -> None:
    bind = op.get_bind()
    minute = _minute_sql(bind.dialect.name)
    grain = int(os.environ.get("SDB_EXTRACTION_WINDOW_S", "3600")) // 60 or 1
    anonymous = "q.endpoint = '/predict' AND q.client_id IS NOT NULL AND q.user_id IS NULL"
    op.execute(
        "INSERT INTO audit_clients (client_id) SELECT DISTINCT q.client_id FROM query_audits q "
        f"WHERE {anonymous}"
    )
    op.execute(
        "INSERT INTO usage_minutes (minute, endpoint, model, status, requests, samples) "
        f"SELECT {minute}, q.endpoint, COALESCE(q.model, ''), q.status, count(*), sum(q.n_samples) "
        f"FROM query_audits q WHERE q.endpoint = '/predict' GROUP BY {minute}, q.endpoint, "
        "COALESCE(q.model, ''), q.status"
    )
    bucket = f"(({minute}) / {grain}) * {grain}"
    op.execute(
        "INSERT INTO client_usage (client_ref, minute, status, requests, samples) "
        f"SELECT c.id, {bucket}, q.status, count(*), sum(q.n_samples) "
        f"FROM query_audits q JOIN audit_clients c ON c.client_id = q.client_id WHERE {anonymous} "
        f"GROUP BY c.id, {bucket}, q.status"
    )
    op.execute(
        "INSERT INTO client_days (client_ref, day, requests, samples, peak_window_samples) "
        "SELECT client_ref, (minute / 1440) * 1440, sum(requests), sum(samples), max(samples) "
        "FROM client_usage WHERE status = 200 GROUP BY client_ref, (minute / 1440) * 1440"
    )
    rollups = sa.table(
        "audit_rollups",
        sa.column("name", sa.String),
        sa.column("last_id", sa.BigInteger),
        sa.column("updated_at", sa.DateTime(timezone=True)),
    )
    now = datetime.now(UTC)
    op.bulk_insert(
        rollups,
        [{"name": "distill", "last_id": 0, "updated_at": now if bind.dialect.name != "sqlite" else now.replace(tzinfo=None)}],
    )


def downgrade() -> None:
    op.drop_table("audit_flushes")
    op.drop_table("audit_rollups")
    op.drop_table("user_usage")
    op.drop_table("client_days")
    op.drop_table("client_usage")
    op.drop_table("usage_minutes")
    op.drop_table("audit_clients")
