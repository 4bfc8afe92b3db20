"""bulk migrate: operations with a parent, started when their parent makes room; policies
that migrate every endpoint of an organization

``parent_id`` ties a bulk migrate's children to it; ``started_at`` tells a child that waits for
room (NULL) from one that has started; ``deadline_at`` is NULL for a bulk operation and for a
child until it starts (docs/architecture.md, "Bulk migrate"). Operations stored before started
when they were created.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04 03:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import models.base

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("operations") as batch:
        batch.add_column(sa.Column("parent_id", sa.Uuid(), nullable=True))
        batch.add_column(
            sa.Column("started_at", models.base.UTCDateTime(timezone=True), nullable=True)
        )
        batch.alter_column(
            "deadline_at", existing_type=models.base.UTCDateTime(timezone=True), nullable=True
        )
        batch.create_foreign_key(
            op.f("fk_operations_parent_id_operations"), "operations", ["parent_id"], ["id"]
        )
        batch.create_index("ix_operations_parent", ["parent_id", "created_at", "id"])
    op.execute("UPDATE operations SET started_at = created_at")
    with op.batch_alter_table("rotation_policies") as batch:
        batch.add_column(sa.Column("max_concurrency", sa.Integer(), nullable=True))
    op.create_index(
        "uq_rotation_policies_org_endpoints",
        "rotation_policies",
        ["org_id"],
        unique=True,
        postgresql_where=sa.text("deleted_at IS NULL AND target = 'org_endpoints'"),
        sqlite_where=sa.text("deleted_at IS NULL AND target = 'org_endpoints'"),
    )


def downgrade() -> None:
    op.execute("DELETE FROM rotation_policies WHERE target = 'org_endpoints'")
    op.drop_index("uq_rotation_policies_org_endpoints", table_name="rotation_policies")
    with op.batch_alter_table("rotation_policies") as batch:
        batch.drop_column("max_concurrency")
    op.execute(
        "DELETE FROM operation_steps WHERE operation_id IN (SELECT id FROM operations WHERE parent_id IS NOT NULL OR kind = 'bulk_migrate')"
    )
    op.execute("DELETE FROM operations WHERE parent_id IS NOT NULL")
    op.execute("DELETE FROM operations WHERE kind = 'bulk_migrate'")
    with op.batch_alter_table("operations") as batch:
        batch.drop_index("ix_operations_parent")
        batch.drop_constraint(op.f("fk_operations_parent_id_operations"), type_="foreignkey")
        batch.alter_column(
            "deadline_at", existing_type=models.base.UTCDateTime(timezone=True), nullable=False
        )
        batch.drop_column("started_at")
        batch.drop_column("parent_id")
