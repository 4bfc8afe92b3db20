"""``operation.advance``: one step of an operation per message, then the next message."""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from models import operation as operations
from models.db import Database, get_database
from workers.app import app
from workers.deliveries import attempt
from workers.enqueue import send_after_commit
from workers.names import TaskName


def advance(db: Database, operation_id: uuid.UUID) -> None:
    """Run the operation's current step; a duplicate or early call does nothing (invariant 3)."""
    with db.session() as session:
        step = operations.begin_advance(session, operation_id)
        _schedule(session, operation_id, step)
    if step.probe_delivery_id is None:
        return
    if step.deliver_first is not None:
        attempt(db, step.deliver_first)  # the in-band handoff; retried like any delivery
    attempt(db, step.probe_delivery_id)  # the HTTP request, outside any transaction
    with db.session() as session:
        _schedule(session, operation_id, operations.finish_probe(session, operation_id))


def _schedule(session: Session, operation_id: uuid.UUID, step: operations.Advance) -> None:
    if step.again_in is not None:
        send_after_commit(
            session, TaskName.OPERATION_ADVANCE, operation_id, countdown=step.again_in
        )


@app.task(name=TaskName.OPERATION_ADVANCE)
def advance_operation(operation_id: str) -> None:
    advance(get_database(), uuid.UUID(operation_id))
