"""Use cases that change several nouns at once, above the table modules (docs/architecture.md,
"The shape"): the modules below each own their tables and import downwards only; what must
touch an endpoint, its deliveries, the operations that hold its secret and its policies in one
unit of work is written here, once, for every caller (the API, the workers, the command line).
"""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from models import clock
from models.delivery import abandon_pending
from models.endpoint import WebhookEndpoint, get_endpoint
from models.operation import ensure_idle, forget_endpoint_secret
from models.policy import end_policies_for_endpoint


def retire_endpoint(session: Session, endpoint: WebhookEndpoint) -> None:
    """The endpoint stops receiving: marked deleted (its row and history stay), its pending
    deliveries abandoned, an operation's unrevealed copy of its secret forgotten. Deleting it,
    and a migration deleting the old endpoint or rolling back the new one, all end this way."""
    now = clock.now()
    abandon_pending(session, endpoint.id)
    forget_endpoint_secret(session, endpoint)
    endpoint.deleted_at = now
    endpoint.active = False
    endpoint.updated_at = now


def delete_endpoint(session: Session, org_id: uuid.UUID, endpoint_id: uuid.UUID) -> WebhookEndpoint:
    """``DELETE /v1/webhooks/{id}``: 409 while a migration uses it; its policies end with it."""
    endpoint = get_endpoint(session, org_id, endpoint_id, for_update=True)
    ensure_idle(session, endpoint.id)
    retire_endpoint(session, endpoint)
    end_policies_for_endpoint(session, endpoint.id)
    return endpoint
