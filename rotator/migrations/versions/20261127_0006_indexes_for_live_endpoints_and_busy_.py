"""indexes for live endpoints and busy checks

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 15:23:06.742189
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_operations_unfinished_new_endpoint",
        "operations",
        ["new_endpoint_id"],
        unique=False,
        postgresql_where=sa.text("finished_at IS NULL"),
        sqlite_where=sa.text("finished_at IS NULL"),
    )
    op.create_index(
        "ix_webhook_endpoints_org_live",
        "webhook_endpoints",
        ["org_id"],
        unique=False,
        postgresql_where=sa.text("deleted_at IS NULL"),
        sqlite_where=sa.text("deleted_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_webhook_endpoints_org_live",
        table_name="webhook_endpoints",
        postgresql_where=sa.text("deleted_at IS NULL"),
        sqlite_where=sa.text("deleted_at IS NULL"),
    )
    op.drop_index(
        "ix_operations_unfinished_new_endpoint",
        table_name="operations",
        postgresql_where=sa.text("finished_at IS NULL"),
        sqlite_where=sa.text("finished_at IS NULL"),
    )
