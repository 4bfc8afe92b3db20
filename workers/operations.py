"""``operation.advance``: one step of an operation per message, then the next message."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event, inspect
from sqlalchemy.orm import Session

from models import operation as operations
from models.db import Database, get_database
from rotator import logs, metrics
from workers.app import app
from workers.deliveries import attempt
from workers.enqueue import send_after_commit
from workers.names import TaskName

log = logging.getLogger("rotator.operations")


def advance(db: Database, operation_id: uuid.UUID) -> None:
    """Run the operation's current step; a duplicate or early call does nothing (invariant 3)."""
    with logs.bound(operation_id=operation_id):
        with db.session() as session:
            watch = _StepWatch.on(session, operation_id)
            step = operations.begin_advance(session, operation_id)
            _schedule(session, operation_id, step)
        watch.report(db, "probe_sent" if step.probe_delivery_id is not None else "noop")
        if step.probe_delivery_id is None:
            return
        if step.deliver_first is not None:
            attempt(db, step.deliver_first)  # the in-band handoff; retried like any delivery
        attempt(db, step.probe_delivery_id)  # the HTTP request, outside any transaction
        with db.session() as session:
            watch = _StepWatch.on(session, operation_id)
            after = operations.finish_probe(session, operation_id)
            _schedule(session, operation_id, after)
        watch.report(db, "waiting" if after.again_in is not None else "noop")


def _schedule(session: Session, operation_id: uuid.UUID, step: operations.Advance) -> None:
    if step.again_in is not None:
        send_after_commit(
            session, TaskName.OPERATION_ADVANCE, operation_id, countdown=step.again_in
        )


@dataclass
class _StepWatch:
    """What one unit of work did to an operation, seen as its rows are flushed: the steps it
    finished and whether it ended the operation. Reported after the commit, so a rolled-back
    step is neither logged nor observed."""

    operation_id: uuid.UUID
    operation: operations.Operation | None = None
    finished: dict[uuid.UUID, operations.OperationStep] = field(default_factory=dict)
    ended: bool = False

    @classmethod
    def on(cls, session: Session, operation_id: uuid.UUID) -> _StepWatch:
        watch = cls(operation_id)
        event.listen(session, "before_flush", watch._before_flush)
        return watch

    def _before_flush(self, session: Session, *_: Any) -> None:
        for row in session.dirty:
            if not isinstance(row, operations.OperationStep | operations.Operation):
                continue
            if isinstance(row, operations.Operation) and row.id == self.operation_id:
                self.operation = row
            history = inspect(row).attrs.finished_at.history
            if history.added and history.added[0] is not None and not any(history.deleted):
                if isinstance(row, operations.Operation):
                    self.ended = True
                else:
                    self.finished[row.id] = row

    def report(self, db: Database, otherwise: str) -> None:
        """One log line per finished step (its duration observed), else one for the advance."""
        operation = self.operation
        kind = operation.kind if operation is not None else None
        fields = {"task": str(TaskName.OPERATION_ADVANCE), "kind": kind}
        for row in sorted(self.finished.values(), key=lambda step: step.position):
            if row.started_at is not None and row.finished_at is not None and kind is not None:
                seconds = (row.finished_at - row.started_at).total_seconds()
                metrics.observe_step(db.settings, kind, row.name, seconds)
            log.info("operation step", extra={**fields, "step": row.name, "outcome": row.state})
        current = operation.current_step() if operation is not None else None
        if otherwise != "noop" and current is not None and not self.ended:
            log.info("operation step", extra={**fields, "step": current.name, "outcome": otherwise})
        elif not self.finished:  # a duplicate or early message: nothing to do
            log.debug("operation step", extra={**fields, "step": None, "outcome": otherwise})
        if self.ended and operation is not None:
            log.info("operation ended", extra={**fields, "state": operation.state})


@app.task(name=TaskName.OPERATION_ADVANCE)
def advance_operation(operation_id: str) -> None:
    advance(get_database(), uuid.UUID(operation_id))
