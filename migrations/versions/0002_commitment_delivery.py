"""storage commitment delivery: leases, deadline, retries, reported outcome per item

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 03:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("commitment_request", schema=None) as batch_op:
        batch_op.add_column(sa.Column("deadline", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("lease_owner", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("lease_expires_at", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("next_attempt_at", sa.Float(), nullable=True))
        # server_default: rows written by 0001 get a value
        batch_op.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("event_type", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("delivered_via", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("last_error", sa.Text(), nullable=True))
        batch_op.create_index(batch_op.f("ix_commitment_request_state"), ["state"], unique=False)
    with op.batch_alter_table("commitment_item", schema=None) as batch_op:
        batch_op.add_column(sa.Column("failure_reason", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("commitment_item", schema=None) as batch_op:
        batch_op.drop_column("failure_reason")
    with op.batch_alter_table("commitment_request", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_commitment_request_state"))
        for column in (
            "last_error",
            "delivered_via",
            "event_type",
            "attempts",
            "next_attempt_at",
            "lease_expires_at",
            "lease_owner",
            "deadline",
        ):
            batch_op.drop_column(column)
