"""Re-encrypting every stored secret under the current at-rest key (``secrets reencrypt``)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import operation, org_secret
from models.db import box_of
from models.endpoint import WebhookEndpoint, seal_secret_bytes, signing_key


def reencrypt_all(session: Session) -> dict[str, int]:
    """Re-seal what an older key sealed; already-current rows are left alone."""
    box = box_of(session)
    endpoints = 0
    for endpoint in session.scalars(select(WebhookEndpoint).with_for_update()):
        if not box.is_current(endpoint.secret_ciphertext):
            seal_secret_bytes(session, endpoint, signing_key(session, endpoint))
            endpoints += 1
    return {
        "webhook_endpoints": endpoints,
        "org_secrets": org_secret.reencrypt(session),
        "operations": operation.reencrypt(session),
    }
