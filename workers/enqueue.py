"""Publishing task messages after the commit that made their work visible (invariant 2)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.orm import Session

from models.db import after_commit
from workers.app import app
from workers.names import TaskName


def send(name: TaskName, *ids: uuid.UUID | str, countdown: float | None = None) -> None:
    """Publish now. Arguments are ids only: a message never carries a secret."""
    options: dict[str, Any] = {}
    if countdown is not None:
        options["countdown"] = max(0.0, countdown)
    app.send_task(str(name), args=[str(value) for value in ids], **options)


def send_after_commit(
    session: Session, name: TaskName, *ids: uuid.UUID | str, countdown: float | None = None
) -> None:
    """Publish once ``session`` commits; nothing is sent if it rolls back."""
    after_commit(session, lambda: send(name, *ids, countdown=countdown))
