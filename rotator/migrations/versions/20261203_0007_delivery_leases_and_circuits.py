"""delivery leases and endpoint circuits

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 16:50:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import models.base

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(
            sa.Column("leased_until", models.base.UTCDateTime(timezone=True), nullable=True)
        )
    op.create_index("ix_deliveries_leased_until", "deliveries", ["leased_until"], unique=False)
    op.create_table(
        "endpoint_circuits",
        sa.Column("endpoint_id", sa.Uuid(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("trips", sa.Integer(), nullable=False),
        sa.Column("open_until", models.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("updated_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["endpoint_id"],
            ["webhook_endpoints.id"],
            name=op.f("fk_endpoint_circuits_endpoint_id_webhook_endpoints"),
        ),
        sa.PrimaryKeyConstraint("endpoint_id", name=op.f("pk_endpoint_circuits")),
    )


def downgrade() -> None:
    op.drop_table("endpoint_circuits")
    op.drop_index("ix_deliveries_leased_until", table_name="deliveries")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("leased_until")
