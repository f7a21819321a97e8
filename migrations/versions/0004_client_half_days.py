"""client_days: the sums of the windows starting in each day's first 12 hours (UTC), backfilled from
client_usage, so that the clients ranking reads whole half days instead of their windows

The windows already pruned (SDB_RETAIN_CLIENT_WINDOWS_DAYS) cannot be summed again: those days get the sums
of the windows left, as every partial-day read of them already did.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 01:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("client_days") as batch:
        batch.add_column(sa.Column("first_half_requests", sa.BigInteger(), server_default=sa.text("0"), nullable=False))
        batch.add_column(sa.Column("first_half_samples", sa.BigInteger(), server_default=sa.text("0"), nullable=False))
    half = (
        "FROM client_usage u WHERE u.client_ref = client_days.client_ref AND u.status = 200 "
        "AND u.minute >= client_days.day AND u.minute < client_days.day + 720"
    )
    op.execute(
        f"UPDATE client_days SET first_half_requests = COALESCE((SELECT sum(u.requests) {half}), 0), "
        f"first_half_samples = COALESCE((SELECT sum(u.samples) {half}), 0)"
    )


def downgrade() -> None:
    with op.batch_alter_table("client_days") as batch:
        batch.drop_column("first_half_samples")
        batch.drop_column("first_half_requests")
