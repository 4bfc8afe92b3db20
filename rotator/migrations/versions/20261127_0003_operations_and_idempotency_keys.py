"""operations and idempotency keys

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 14:17:22.302520
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import models.base

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "idempotency_keys",
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("request_sha256", sa.String(length=64), nullable=False),
        sa.Column("response_ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_idempotency_keys_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_idempotency_keys")),
        sa.UniqueConstraint("org_id", "key", name=op.f("uq_idempotency_keys_org_id")),
    )
    op.create_table(
        "operations",
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("policy_id", sa.Uuid(), nullable=True),
        sa.Column("source_endpoint_id", sa.Uuid(), nullable=True),
        sa.Column("new_endpoint_id", sa.Uuid(), nullable=True),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("handoff", sa.String(length=16), nullable=False),
        sa.Column("new_secret_ciphertext", sa.LargeBinary(), nullable=True),
        sa.Column("secret_revealed", sa.Boolean(), nullable=False),
        sa.Column("probe_delivery_id", sa.Uuid(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("wait_seconds", sa.Float(), nullable=False),
        sa.Column("deadline_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("next_advance_at", models.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("error_message", sa.String(length=500), nullable=True),
        sa.Column("created_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", models.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.ForeignKeyConstraint(
            ["new_endpoint_id"],
            ["webhook_endpoints.id"],
            name=op.f("fk_operations_new_endpoint_id_webhook_endpoints"),
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_operations_org_id_organizations")
        ),
        sa.ForeignKeyConstraint(
            ["source_endpoint_id"],
            ["webhook_endpoints.id"],
            name=op.f("fk_operations_source_endpoint_id_webhook_endpoints"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_operations")),
    )
    op.create_index(
        "ix_operations_org_created", "operations", ["org_id", "created_at", "id"], unique=False
    )
    op.create_index(
        "ix_operations_unfinished_next",
        "operations",
        ["finished_at", "next_advance_at"],
        unique=False,
    )
    op.create_index(
        "uq_operations_one_active_per_source",
        "operations",
        ["source_endpoint_id"],
        unique=True,
        postgresql_where=sa.text("finished_at IS NULL"),
        sqlite_where=sa.text("finished_at IS NULL"),
    )
    op.create_table(
        "operation_steps",
        sa.Column("operation_id", sa.Uuid(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("started_at", models.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("finished_at", models.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("next_attempt_at", models.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.String(length=500), nullable=True),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.ForeignKeyConstraint(
            ["operation_id"],
            ["operations.id"],
            name=op.f("fk_operation_steps_operation_id_operations"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_operation_steps")),
        sa.UniqueConstraint(
            "operation_id", "position", name=op.f("uq_operation_steps_operation_id")
        ),
    )


def downgrade() -> None:
    op.drop_table("operation_steps")
    op.drop_index(
        "uq_operations_one_active_per_source",
        table_name="operations",
        postgresql_where=sa.text("finished_at IS NULL"),
        sqlite_where=sa.text("finished_at IS NULL"),
    )
    op.drop_index("ix_operations_unfinished_next", table_name="operations")
    op.drop_index("ix_operations_org_created", table_name="operations")
    op.drop_table("operations")
    op.drop_table("idempotency_keys")
