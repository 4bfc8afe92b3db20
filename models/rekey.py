"""Every column that stores ciphertext, and re-encrypting them under the current at-rest key.

``ENCRYPTED_COLUMNS`` is the one registry of encrypted columns: ``rotator secrets reencrypt``
walks it, so an at-rest key can be dropped once it has run. A column that stores ciphertext is
named ``*_ciphertext`` and listed here with the associated data its rows are sealed under; a
test compares the schema with this list, so a new encrypted column cannot be left out.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from models import endpoint, idempotency, operation, org_secret, provider
from models.db import box_of


@dataclass(frozen=True)
class EncryptedColumn:
    column: InstrumentedAttribute[Any]
    context: Callable[[uuid.UUID], str]  # the associated data of the row with this id

    @property
    def table(self) -> str:
        return str(self.column.class_.__tablename__)

    @property
    def name(self) -> str:
        return self.column.key


ENCRYPTED_COLUMNS: tuple[EncryptedColumn, ...] = (
    EncryptedColumn(endpoint.WebhookEndpoint.secret_ciphertext, endpoint.secret_context),
    EncryptedColumn(org_secret.OrgSecret.secret_ciphertext, org_secret.secret_context),
    EncryptedColumn(operation.Operation.new_secret_ciphertext, operation.secret_context),
    EncryptedColumn(idempotency.IdempotencyKey.response_ciphertext, idempotency.response_context),
    EncryptedColumn(provider.Provider.key_ciphertext, provider.key_context),
)


def reencrypt_all(session: Session) -> dict[str, int]:
    """Re-seal what an older key sealed; already-current rows are left alone.

    Returns how many rows each table had re-sealed. Rows are locked while this runs, so a
    concurrent write waits rather than being overwritten with the old value.
    """
    box = box_of(session)
    counts: dict[str, int] = {}
    for encrypted in ENCRYPTED_COLUMNS:
        model = encrypted.column.class_
        rows = session.execute(
            select(model.id, encrypted.column)
            .where(encrypted.column.is_not(None))
            .with_for_update(key_share=True)
        ).all()
        changes = []
        for row_id, blob in rows:
            if box.is_current(blob):
                continue
            context = encrypted.context(row_id)
            resealed = box.encrypt(box.decrypt(blob, context=context), context=context)
            changes.append({"id": row_id, encrypted.name: resealed})
        if changes:
            session.execute(update(model), changes)  # by primary key, one statement per batch
        counts[encrypted.table] = counts.get(encrypted.table, 0) + len(changes)
    return counts
