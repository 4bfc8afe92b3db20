"""idempotency keys bound to the API key that made the response

Rows stored before keep a NULL api_key_id: they are replayed to no key (a retry with such a
key is refused with 422 until the row expires, 24 hours after it was stored).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 17:05:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.add_column(sa.Column("api_key_id", sa.Uuid(), nullable=True))
        batch.create_foreign_key(
            op.f("fk_idempotency_keys_api_key_id_api_keys"), "api_keys", ["api_key_id"], ["id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.drop_constraint(op.f("fk_idempotency_keys_api_key_id_api_keys"), type_="foreignkey")
        batch.drop_column("api_key_id")
