"""licensee_images: a keyed sample of the images each watermarked API key sent to /distill-batch, per
model, that `sdb trace` probes a suspect with (service/watermarks/samples.py)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 08:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "licensee_images",
        sa.Column("id", BigId, nullable=False),
        sa.Column("api_key_id", BigId, nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("rank", sa.BigInteger(), nullable=False),
        sa.Column("image", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["api_key_id"],
            ["api_keys.id"],
            name=op.f("fk_licensee_images_api_key_id_api_keys"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_licensee_images")),
        sa.UniqueConstraint("api_key_id", "model", "rank", name=op.f("uq_licensee_images_api_key_id")),
    )


def downgrade() -> None:
    op.drop_table("licensee_images")
