"""Expiring previous organization secrets. Correctness never waits for this (invariant 5):
signing and verification already ignore a previous secret past its ``valid_until``, and the
sweeper tick expires whatever a lost message left (docs/architecture.md, "The organization
secret")."""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from models import org_secret
from models.db import get_database, settings_of
from workers.app import app
from workers.enqueue import send_after_commit
from workers.names import TaskName

# Longer windows are left to the sweeper rather than held as a countdown in the broker.
MAX_EXPIRY_COUNTDOWN_S = 900


def expire_later(session: Session, rotation: org_secret.Rotation) -> None:
    """Once ``rotation`` commits, expire its previous secret just after its grace window: the
    one follow-up of every organization secret rotation, by the API or by a policy's run."""
    grace = settings_of(session).org_secret_grace_seconds
    if rotation.previous_id is not None and grace <= MAX_EXPIRY_COUNTDOWN_S:
        send_after_commit(
            session, TaskName.ORG_SECRET_EXPIRE, rotation.previous_id, countdown=grace + 1
        )


@app.task(name=TaskName.ORG_SECRET_EXPIRE)
def expire_org_secret(secret_id: str) -> None:
    with get_database().session() as session:
        org_secret.expire_one(session, uuid.UUID(secret_id))
