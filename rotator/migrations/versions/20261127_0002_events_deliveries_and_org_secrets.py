"""events deliveries and org secrets

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 14:06:31.304875
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import models.base

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("replay_of", sa.Uuid(), nullable=True),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_events_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index(
        "ix_events_org_replay_created",
        "events",
        ["org_id", "replay_of", "created_at"],
        unique=False,
    )
    op.create_table(
        "org_secrets",
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("secret_ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("valid_until", models.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("expired_at", models.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("expired_by", sa.String(length=16), nullable=True),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_org_secrets_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_org_secrets")),
    )
    op.create_index(
        "ix_org_secrets_state_valid_until", "org_secrets", ["state", "valid_until"], unique=False
    )
    op.create_index(
        "uq_org_secrets_one_current",
        "org_secrets",
        ["org_id"],
        unique=True,
        postgresql_where=sa.text("state = 'current'"),
        sqlite_where=sa.text("state = 'current'"),
    )
    op.create_index(
        "uq_org_secrets_one_previous",
        "org_secrets",
        ["org_id"],
        unique=True,
        postgresql_where=sa.text("state = 'previous'"),
        sqlite_where=sa.text("state = 'previous'"),
    )
    op.create_table(
        "deliveries",
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("endpoint_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", models.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("created_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.ForeignKeyConstraint(
            ["endpoint_id"],
            ["webhook_endpoints.id"],
            name=op.f("fk_deliveries_endpoint_id_webhook_endpoints"),
        ),
        sa.ForeignKeyConstraint(
            ["event_id"], ["events.id"], name=op.f("fk_deliveries_event_id_events")
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_deliveries_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deliveries")),
    )
    op.create_index(
        "ix_deliveries_endpoint_state", "deliveries", ["endpoint_id", "state"], unique=False
    )
    op.create_index(
        "ix_deliveries_state_next_attempt", "deliveries", ["state", "next_attempt_at"], unique=False
    )
    op.create_table(
        "delivery_attempts",
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("delivery_id", sa.Uuid(), nullable=False),
        sa.Column("endpoint_id", sa.Uuid(), nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("event_type", sa.String(length=64), nullable=False),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("response_time_ms", sa.Integer(), nullable=False),
        sa.Column("request_body_sha256", sa.String(length=64), nullable=False),
        sa.Column("request_body_bytes", sa.Integer(), nullable=False),
        sa.Column("response_body_excerpt", sa.Text(), nullable=False),
        sa.Column("request_headers", sa.JSON(), nullable=False),
        sa.Column("error", sa.String(length=500), nullable=True),
        sa.Column("occurred_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["deliveries.id"],
            name=op.f("fk_delivery_attempts_delivery_id_deliveries"),
        ),
        sa.ForeignKeyConstraint(
            ["endpoint_id"],
            ["webhook_endpoints.id"],
            name=op.f("fk_delivery_attempts_endpoint_id_webhook_endpoints"),
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_delivery_attempts_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_attempts")),
    )
    op.create_index(
        "ix_delivery_attempts_delivery", "delivery_attempts", ["delivery_id"], unique=False
    )
    op.create_index(
        "ix_delivery_attempts_org_occurred",
        "delivery_attempts",
        ["org_id", "occurred_at", "id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_delivery_attempts_org_occurred", table_name="delivery_attempts")
    op.drop_index("ix_delivery_attempts_delivery", table_name="delivery_attempts")
    op.drop_table("delivery_attempts")
    op.drop_index("ix_deliveries_state_next_attempt", table_name="deliveries")
    op.drop_index("ix_deliveries_endpoint_state", table_name="deliveries")
    op.drop_table("deliveries")
    op.drop_index(
        "uq_org_secrets_one_previous",
        table_name="org_secrets",
        postgresql_where=sa.text("state = 'previous'"),
        sqlite_where=sa.text("state = 'previous'"),
    )
    op.drop_index(
        "uq_org_secrets_one_current",
        table_name="org_secrets",
        postgresql_where=sa.text("state = 'current'"),
        sqlite_where=sa.text("state = 'current'"),
    )
    op.drop_index("ix_org_secrets_state_valid_until", table_name="org_secrets")
    op.drop_table("org_secrets")
    op.drop_index("ix_events_org_replay_created", table_name="events")
    op.drop_table("events")
