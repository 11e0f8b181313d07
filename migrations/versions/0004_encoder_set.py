"""backfill: the codec candidates (and LVPNet weights) each archived record was chosen among

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 09:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.add_column(sa.Column("encoder_set", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.drop_column("encoder_set")
