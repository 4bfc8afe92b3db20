"""indexes the retention prune walks

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 16:50:00.000000

``if_not_exists``: on a large PostgreSQL database an operator may create these beforehand with
``CREATE INDEX CONCURRENTLY`` (same names) so that the upgrade does not block writes while it
builds them (docs/operating.md, Retention).
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

INDEXES = (
    ("ix_delivery_attempts_occurred", "delivery_attempts", ["occurred_at"]),
    ("ix_deliveries_created", "deliveries", ["created_at"]),
    ("ix_deliveries_event", "deliveries", ["event_id"]),
    ("ix_events_created", "events", ["created_at"]),
    ("ix_idempotency_keys_created", "idempotency_keys", ["created_at"]),
)


def upgrade() -> None:
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns, unique=False, if_not_exists=True)


def downgrade() -> None:
    for name, table, _columns in reversed(INDEXES):
        op.drop_index(name, table_name=table, if_exists=True)
