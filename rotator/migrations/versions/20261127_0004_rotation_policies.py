"""rotation policies

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 14:22:00.284350
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import models.base

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rotation_policies",
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("target", sa.String(length=16), nullable=False),
        sa.Column("endpoint_id", sa.Uuid(), nullable=True),
        sa.Column("strategy", sa.String(length=16), nullable=False),
        sa.Column("interval_seconds", sa.Integer(), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("handoff", sa.String(length=16), nullable=False),
        sa.Column("next_run_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_run_at", models.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_operation_id", sa.Uuid(), nullable=True),
        sa.Column("created_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", models.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.ForeignKeyConstraint(
            ["endpoint_id"],
            ["webhook_endpoints.id"],
            name=op.f("fk_rotation_policies_endpoint_id_webhook_endpoints"),
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_rotation_policies_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rotation_policies")),
    )
    op.create_index(
        "ix_rotation_policies_due",
        "rotation_policies",
        ["deleted_at", "paused", "next_run_at"],
        unique=False,
    )
    op.create_index(
        "ix_rotation_policies_org_created",
        "rotation_policies",
        ["org_id", "created_at", "id"],
        unique=False,
    )
    op.create_index(
        "uq_rotation_policies_endpoint",
        "rotation_policies",
        ["endpoint_id"],
        unique=True,
        postgresql_where=sa.text("deleted_at IS NULL AND endpoint_id IS NOT NULL"),
        sqlite_where=sa.text("deleted_at IS NULL AND endpoint_id IS NOT NULL"),
    )
    op.create_index(
        "uq_rotation_policies_org_secret",
        "rotation_policies",
        ["org_id"],
        unique=True,
        postgresql_where=sa.text("deleted_at IS NULL AND target = 'org_secret'"),
        sqlite_where=sa.text("deleted_at IS NULL AND target = 'org_secret'"),
    )
    # Batch mode: SQLite cannot add a constraint to an existing table in place.
    with op.batch_alter_table("operations") as batch:
        batch.add_column(
            sa.Column("scheduled_for", models.base.UTCDateTime(timezone=True), nullable=True)
        )
        batch.add_column(sa.Column("handoff_delivery_id", sa.Uuid(), nullable=True))
        batch.create_unique_constraint(
            op.f("uq_operations_policy_id"), ["policy_id", "scheduled_for"]
        )


def downgrade() -> None:
    with op.batch_alter_table("operations") as batch:
        batch.drop_constraint(op.f("uq_operations_policy_id"), type_="unique")
        batch.drop_column("handoff_delivery_id")
        batch.drop_column("scheduled_for")
    op.drop_index(
        "uq_rotation_policies_org_secret",
        table_name="rotation_policies",
        postgresql_where=sa.text("deleted_at IS NULL AND target = 'org_secret'"),
        sqlite_where=sa.text("deleted_at IS NULL AND target = 'org_secret'"),
    )
    op.drop_index(
        "uq_rotation_policies_endpoint",
        table_name="rotation_policies",
        postgresql_where=sa.text("deleted_at IS NULL AND endpoint_id IS NOT NULL"),
        sqlite_where=sa.text("deleted_at IS NULL AND endpoint_id IS NOT NULL"),
    )
    op.drop_index("ix_rotation_policies_org_created", table_name="rotation_policies")
    op.drop_index("ix_rotation_policies_due", table_name="rotation_policies")
    op.drop_table("rotation_policies")
