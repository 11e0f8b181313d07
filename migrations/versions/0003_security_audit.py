"""security and audit: API keys, admin password, audit events, tombstones, scrub runs; per-instance
sender and classical-codec size for the dashboard

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 06:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.add_column(sa.Column("classical_bytes", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("calling_ae", sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f("ix_instance_calling_ae"), ["calling_ae"], unique=False)
    op.create_table(
        "api_key",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(length=64), nullable=False, unique=True),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("key_sha256", sa.String(length=64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("revoked_at", TZ, nullable=True),
        sa.Column("last_used_at", TZ, nullable=True),
    )
    op.create_table(
        "admin_password",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("scrypt_hash", sa.String(length=256), nullable=False),
        sa.Column("set_at", TZ, nullable=False),
    )
    op.create_table(
        "audit_event",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("at", TZ, nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("actor_kind", sa.String(length=16), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("interface", sa.String(length=16), nullable=False),
        sa.Column("remote", sa.String(length=64), nullable=True),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
    )
    op.create_index("ix_audit_event_at", "audit_event", ["at"])
    op.create_index(op.f("ix_audit_event_action"), "audit_event", ["action"])
    op.create_index(op.f("ix_audit_event_study_instance_uid"), "audit_event", ["study_instance_uid"])
    op.create_table(
        "tombstone",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("level", sa.String(length=16), nullable=False),
        sa.Column("uid", sa.String(length=64), nullable=False),
        sa.Column("deleted_at", TZ, nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("instances", sa.Integer(), nullable=False),
    )
    op.create_index(op.f("ix_tombstone_uid"), "tombstone", ["uid"])
    op.create_table(
        "scrub_run",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("started_at", TZ, nullable=False),
        sa.Column("finished_at", TZ, nullable=True),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("checked", sa.Integer(), nullable=False),
        sa.Column("corrupt", sa.Integer(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("scrub_run")
    op.drop_index(op.f("ix_tombstone_uid"), table_name="tombstone")
    op.drop_table("tombstone")
    op.drop_index(op.f("ix_audit_event_study_instance_uid"), table_name="audit_event")
    op.drop_index(op.f("ix_audit_event_action"), table_name="audit_event")
    op.drop_index("ix_audit_event_at", table_name="audit_event")
    op.drop_table("audit_event")
    op.drop_table("admin_password")
    op.drop_table("api_key")
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instance_calling_ae"))
        batch_op.drop_column("calling_ae")
        batch_op.drop_column("classical_bytes")
