"""heartbeats, and the indexes /metrics counts by

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 16:05:41.118204
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import models.base

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "heartbeats",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_heartbeats")),
    )
    op.create_index("ix_operations_kind_state", "operations", ["kind", "state"], unique=False)
    op.create_index("ix_delivery_attempts_outcome", "delivery_attempts", ["outcome"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_delivery_attempts_outcome", table_name="delivery_attempts")
    op.drop_index("ix_operations_kind_state", table_name="operations")
    op.drop_table("heartbeats")
