"""Tidying up expired organization secrets. Correctness never waits for this (invariant 5)."""

from __future__ import annotations

import uuid

from models import org_secret
from models.db import get_database
from workers.app import app
from workers.names import TaskName


@app.task(name=TaskName.ORG_SECRET_EXPIRE)
def expire_org_secret(secret_id: str) -> None:
    with get_database().session() as session:
        org_secret.expire_one(session, uuid.UUID(secret_id))
