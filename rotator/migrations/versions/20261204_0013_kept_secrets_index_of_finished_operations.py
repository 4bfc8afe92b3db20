"""the index of operations that keep a secret covers finished ones only

``forget_endpoint_secret`` and ``forget_org_secret`` look for finished operations still holding
an unrevealed secret; every unfinished migration holds one too, so the index they use grew
with the migrations in flight and each endpoint delete read all of them.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04 06:15:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

KEPT = "new_secret_ciphertext IS NOT NULL"
KEPT_FINISHED = "new_secret_ciphertext IS NOT NULL AND finished_at IS NOT NULL"


def _replace(where: str) -> None:
    op.drop_index("ix_operations_kept_secrets", table_name="operations")
    op.create_index(
        "ix_operations_kept_secrets",
        "operations",
        ["org_id"],
        unique=False,
        postgresql_where=sa.text(where),
        sqlite_where=sa.text(where),
    )


def upgrade() -> None:
    _replace(KEPT_FINISHED)


def downgrade() -> None:
    _replace(KEPT)
