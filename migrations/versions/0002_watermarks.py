"""per-licensee watermarks: api_keys.watermarked, watermark_id and watermark_slot, query_audits.watermark_id

Keys issued before this revision keep unwatermarked soft labels (watermarked false, no watermark id): an
upgrade never changes what an existing licensee receives; an administrator turns the mark on per key
(POST /admin/keys/{id}/watermark). New keys are watermarked by default (service/routes/admin.py).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05 22:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("watermarked", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch.add_column(sa.Column("watermark_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("watermark_slot", sa.Integer(), nullable=True))
        batch.create_index(batch.f("ix_api_keys_watermark_id"), ["watermark_id"])
        batch.create_unique_constraint(batch.f("uq_api_keys_watermark_slot"), ["watermark_slot"])
    with op.batch_alter_table("query_audits") as batch:
        batch.add_column(sa.Column("watermark_id", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("query_audits") as batch:
        batch.drop_column("watermark_id")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_constraint(batch.f("uq_api_keys_watermark_slot"), type_="unique")
        batch.drop_index(batch.f("ix_api_keys_watermark_id"))
        batch.drop_column("watermark_slot")
        batch.drop_column("watermark_id")
        batch.drop_column("watermarked")
