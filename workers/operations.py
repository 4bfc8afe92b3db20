"""``operation.advance``: one step of an operation per message, then the next message."""

from __future__ import annotations

import logging
import uuid

from sqlalchemy.orm import Session

from models import bulk, remote
from models import migration as migrations
from models import operation as operations
from models import policy as policies
from models.db import Database, get_database
from rotator import logs, metrics
from workers.app import app
from workers.deliveries import attempt
from workers.enqueue import send_after_commit
from workers.names import TaskName
from workers.org_secrets import expire_later
from workers.remote import perform
from workers.sending import report_attempt, sender_for

log = logging.getLogger("rotator.operations")


def advance(db: Database, operation_id: uuid.UUID) -> None:
    """Run the operation's current step; a duplicate or early call does nothing (invariant 3).

    A test delivery takes two transactions: the step claims the attempt, the HTTP request runs
    outside any transaction, and its outcome is recorded with the operation's next move.
    """
    with logs.bound(operation_id=operation_id):
        call = None
        with db.session() as session:
            step = migrations.begin_advance(session, operation_id)
            is_remote = step.remote
            if is_remote:  # the same transaction, the operation already locked by it
                call, step = remote.begin(session, operation_id)
            _schedule(session, operation_id, step)
            _tell_parent(session, step)
            if step.org_rotation is not None:
                expire_later(session, step.org_rotation)
        if is_remote:
            _report(db, step, None)
            if call is not None:
                _call_provider(db, operation_id, call)
            return
        _report(db, step, "probe_sent" if step.probe_delivery_id is not None else None)
        if step.probe_delivery_id is None:
            return
        if step.deliver_first is not None:
            attempt(db, step.deliver_first)  # the in-band handoff; retried like any delivery
        probe = step.probe
        sent = None
        if probe is not None:  # else an earlier run's claim is still live: nothing to send
            sent = (probe, sender_for(db).post(probe.url, probe.body, probe.headers))
        with db.session() as session:
            after = migrations.finish_probe(session, operation_id, sent)
            _schedule(session, operation_id, after)
            _tell_parent(session, after)
        if after.recorded is not None:
            report_attempt(db, after.recorded)
        _report(db, after, "waiting" if after.again_in is not None else None)


def _call_provider(db: Database, operation_id: uuid.UUID, call: remote.RemoteCall) -> None:
    """A remote migrate's call, made after the transaction that recorded it is about to be
    made, and its answer taken in a second one (models/remote.py)."""
    reply = perform(db.settings, call)
    with db.session() as session:
        after = remote.record(session, operation_id, call, reply)
        _schedule(session, operation_id, after)
        if after.ended_state == operations.OperationState.SUCCEEDED:
            policies.follow_remote_migration(session, operation_id)
    _report(db, after, "waiting" if after.again_in else None)


def _schedule(session: Session, operation_id: uuid.UUID, step: migrations.Advance) -> None:
    if step.again_in is not None:
        send_after_commit(
            session, TaskName.OPERATION_ADVANCE, operation_id, countdown=step.again_in
        )


def _tell_parent(session: Session, step: migrations.Advance) -> None:
    """A bulk migrate's child that ended in this unit of work makes room for the next ones,
    started in the same unit of work (docs/architecture.md, "Bulk migrate")."""
    if step.ended_state is not None and step.parent_id is not None:
        for child_id in bulk.child_ended(session, step.parent_id):
            send_after_commit(session, TaskName.OPERATION_ADVANCE, child_id)


def _report(db: Database, done: migrations.Advance, outcome: str | None) -> None:
    """After the commit (a rolled-back step is neither logged nor observed): one log line per
    finished step, its duration observed; else one for the step now in progress."""
    fields = {"task": str(TaskName.OPERATION_ADVANCE), "kind": done.kind}
    for step in done.finished_steps:
        if step.seconds is not None and done.kind is not None:
            metrics.observe_step(db.settings, done.kind, step.name, step.seconds)
        log.info("operation step", extra={**fields, "step": step.name, "outcome": step.state})
    if outcome is not None and done.current_step is not None and done.ended_state is None:
        log.info("operation step", extra={**fields, "step": done.current_step, "outcome": outcome})
    elif not done.finished_steps:  # a duplicate or early message: nothing to do
        log.debug("operation step", extra={**fields, "step": None, "outcome": "noop"})
    if done.ended_state is not None:
        if done.kind is not None:
            metrics.count_operation_ended(db.settings, done.kind, done.ended_state)
        log.info("operation ended", extra={**fields, "state": done.ended_state})


@app.task(name=TaskName.OPERATION_ADVANCE)
def advance_operation(operation_id: str) -> None:
    advance(get_database(), uuid.UUID(operation_id))
