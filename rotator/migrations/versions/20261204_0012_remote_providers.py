"""remote providers: accounts at other AgentMessage-compatible services, and the operations
and policies that migrate their endpoints

``providers`` keeps each account's API key sealed (``key_ciphertext``, dropped on delete).
A ``remote_migrate`` operation names its provider and the remote ids of the endpoint it
migrates and of the one it created; ``error_details`` says what a failed one left behind.
Policies of target ``remote_endpoint`` name a provider and a remote endpoint id
(docs/api.md, "Remote providers").

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04 05:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import models.base

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "providers",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("base_url", sa.String(length=2048), nullable=False),
        sa.Column("key_ciphertext", sa.LargeBinary(), nullable=True),
        sa.Column("key_prefix", sa.String(length=12), nullable=False),
        sa.Column("created_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", models.base.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_providers_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_providers")),
    )
    op.create_index("ix_providers_org_created", "providers", ["org_id", "created_at", "id"])
    with op.batch_alter_table("operations") as batch:
        batch.add_column(sa.Column("provider_id", sa.Uuid(), nullable=True))
        batch.add_column(sa.Column("remote_source_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("remote_new_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("error_details", sa.JSON(), nullable=True))
        batch.create_foreign_key(
            op.f("fk_operations_provider_id_providers"), "providers", ["provider_id"], ["id"]
        )
    op.create_index(
        "uq_operations_one_active_per_remote_source",
        "operations",
        ["provider_id", "remote_source_id"],
        unique=True,
        postgresql_where=sa.text("finished_at IS NULL AND remote_source_id IS NOT NULL"),
        sqlite_where=sa.text("finished_at IS NULL AND remote_source_id IS NOT NULL"),
    )
    with op.batch_alter_table("rotation_policies") as batch:
        batch.add_column(sa.Column("provider_id", sa.Uuid(), nullable=True))
        batch.add_column(sa.Column("remote_endpoint_id", sa.String(length=64), nullable=True))
        batch.create_foreign_key(
            op.f("fk_rotation_policies_provider_id_providers"),
            "providers",
            ["provider_id"],
            ["id"],
        )
    op.create_index(
        "uq_rotation_policies_remote_endpoint",
        "rotation_policies",
        ["provider_id", "remote_endpoint_id"],
        unique=True,
        postgresql_where=sa.text("deleted_at IS NULL AND target = 'remote_endpoint'"),
        sqlite_where=sa.text("deleted_at IS NULL AND target = 'remote_endpoint'"),
    )


def downgrade() -> None:
    op.execute("DELETE FROM rotation_policies WHERE target = 'remote_endpoint'")
    op.drop_index("uq_rotation_policies_remote_endpoint", table_name="rotation_policies")
    with op.batch_alter_table("rotation_policies") as batch:
        batch.drop_constraint(
            op.f("fk_rotation_policies_provider_id_providers"), type_="foreignkey"
        )
        batch.drop_column("remote_endpoint_id")
        batch.drop_column("provider_id")
    op.execute(
        "DELETE FROM operation_steps WHERE operation_id IN (SELECT id FROM operations WHERE kind = 'remote_migrate')"
    )
    op.execute("DELETE FROM operations WHERE kind = 'remote_migrate'")
    op.drop_index("uq_operations_one_active_per_remote_source", table_name="operations")
    with op.batch_alter_table("operations") as batch:
        batch.drop_constraint(op.f("fk_operations_provider_id_providers"), type_="foreignkey")
        batch.drop_column("error_details")
        batch.drop_column("remote_new_id")
        batch.drop_column("remote_source_id")
        batch.drop_column("provider_id")
    op.drop_index("ix_providers_org_created", table_name="providers")
    op.drop_table("providers")
