"""secrets not kept past their use

Expired org secrets lose their ciphertext (the column becomes nullable); operations keep a copy
of their new secret only while it is live and unrevealed, found through a partial index. Rows
already past that point are wiped here, as the code now does when they get there.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 16:50:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_org_secrets = sa.table(
    "org_secrets",
    sa.column("state", sa.String),
    sa.column("secret_ciphertext", sa.LargeBinary),
)
_endpoints = sa.table(
    "webhook_endpoints", sa.column("id", sa.Uuid), sa.column("deleted_at", sa.DateTime)
)
_operations = sa.table(
    "operations",
    sa.column("state", sa.String),
    sa.column("finished_at", sa.DateTime),
    sa.column("secret_revealed", sa.Boolean),
    sa.column("new_secret_ciphertext", sa.LargeBinary),
    sa.column("new_endpoint_id", sa.Uuid),
    sa.column("source_endpoint_id", sa.Uuid),
)


def upgrade() -> None:
    with op.batch_alter_table("org_secrets") as batch:
        batch.alter_column("secret_ciphertext", existing_type=sa.LargeBinary(), nullable=True)
    op.execute(
        _org_secrets.update()
        .where(_org_secrets.c.state == "expired")
        .values(secret_ciphertext=None)
    )
    deleted = sa.select(_endpoints.c.id).where(_endpoints.c.deleted_at.is_not(None))
    op.execute(
        _operations.update()
        .where(
            _operations.c.new_secret_ciphertext.is_not(None),
            _operations.c.finished_at.is_not(None),
            sa.or_(
                _operations.c.secret_revealed.is_(True),
                _operations.c.state != "succeeded",
                _operations.c.new_endpoint_id.in_(deleted),
                sa.and_(
                    _operations.c.new_endpoint_id.is_(None),
                    _operations.c.source_endpoint_id.in_(deleted),
                ),
            ),
        )
        .values(new_secret_ciphertext=None)
    )
    op.create_index(
        "ix_operations_kept_secrets",
        "operations",
        ["org_id"],
        unique=False,
        postgresql_where=sa.text("new_secret_ciphertext IS NOT NULL"),
        sqlite_where=sa.text("new_secret_ciphertext IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_operations_kept_secrets",
        table_name="operations",
        postgresql_where=sa.text("new_secret_ciphertext IS NOT NULL"),
        sqlite_where=sa.text("new_secret_ciphertext IS NOT NULL"),
    )
    # The column cannot be required again while expired rows have no ciphertext: those rows,
    # records of past expiries only, go.
    op.execute(_org_secrets.delete().where(_org_secrets.c.secret_ciphertext.is_(None)))
    with op.batch_alter_table("org_secrets") as batch:
        batch.alter_column("secret_ciphertext", existing_type=sa.LargeBinary(), nullable=False)
