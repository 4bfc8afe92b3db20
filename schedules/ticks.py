"""Periodic ticks run by beat: each re-derives its work from the database.

Each tick records its heartbeat in the same transaction as its work, so a beat that stopped (or
ticks that keep failing) shows on /metrics as a growing ``rotator_beat_last_tick_age_seconds``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy.orm import Session

from models import delivery as deliveries
from models import heartbeat, org_secret, policy_runs, retention
from models import operation as operations
from models.db import get_database
from rotator.settings import get_settings
from schedules.beat import beat_schedule
from workers.app import app
from workers.deliveries import enqueue as enqueue_deliveries
from workers.enqueue import send_after_commit
from workers.names import TaskName

log = logging.getLogger("rotator.schedules")

# The schedule these ticks run on. Beat, like a worker, imports the app's task modules (this one
# among them) before it builds its scheduler, so the schedule is in place however beat starts:
# `rotator beat`, `celery -A workers beat` or `rotator dev`. The workers package never imports
# schedules: schedules build on workers, not the other way round.
app.conf.beat_schedule = beat_schedule(get_settings())


def _resend_overdue(
    tick: TaskName,
    overdue: Callable[..., list[uuid.UUID]],
    resend: Callable[[Session, list[uuid.UUID]], None],
    what: str,
) -> int:
    """Re-enqueue every row ``overdue`` finds late by ``reconcile_after_seconds``: its message
    was lost (or its worker died). A duplicate is harmless (invariant 1)."""
    db = get_database()
    with db.session() as session:
        due = overdue(session, older_than=timedelta(seconds=db.settings.reconcile_after_seconds))
        resend(session, due)
        heartbeat.record(session, tick)
    if due:
        log.info("re-enqueued %d %s", len(due), what)
    return len(due)


def _advance_each(session: Session, operation_ids: list[uuid.UUID]) -> None:
    for operation_id in operation_ids:
        send_after_commit(session, TaskName.OPERATION_ADVANCE, operation_id)


@app.task(name=TaskName.DELIVERY_RECONCILE)
def reconcile_deliveries() -> int:
    """Pending deliveries whose next attempt is overdue are sent again, several per message."""
    return _resend_overdue(
        TaskName.DELIVERY_RECONCILE, deliveries.overdue, enqueue_deliveries, "deliveries"
    )


@app.task(name=TaskName.OPERATION_RECONCILE)
def reconcile_operations() -> int:
    """Unfinished operations whose next advance is overdue (lost message, Redis restart, dead
    worker) are advanced again."""
    return _resend_overdue(
        TaskName.OPERATION_RECONCILE,
        operations.overdue,
        _advance_each,
        "stalled operations",
    )


@app.task(name=TaskName.ORG_SECRET_SWEEP)
def sweep_org_secrets() -> int:
    with get_database().session() as session:
        lags = org_secret.sweep(session)
        heartbeat.record(session, TaskName.ORG_SECRET_SWEEP)
    if lags:
        log.info("expired %d org secrets, max lag %.1fs", len(lags), max(lags))
    return len(lags)


@app.task(name=TaskName.POLICY_TICK)
def run_due_policies() -> int:
    """Start one operation per due rotation policy (unique per policy and due time)."""
    with get_database().session() as session:
        runs = policy_runs.run_due(session)
        for run in runs:
            for operation_id in run.advance:
                send_after_commit(session, TaskName.OPERATION_ADVANCE, operation_id)
        heartbeat.record(session, TaskName.POLICY_TICK)
    started = sum(run.operation_id is not None for run in runs)
    if runs:
        log.info("rotation policies due: %d, operations started: %d", len(runs), started)
    return started


@app.task(name=TaskName.RETENTION_PRUNE)
def prune_history() -> int:
    """Delete history older than ``ROTATOR_RETENTION_DAYS``, in short batches (models.retention)."""
    db = get_database()
    pruned = retention.prune(db)
    with db.session() as session:
        heartbeat.record(session, TaskName.RETENTION_PRUNE)
    if pruned.total:
        log.info("retention deleted %s", pruned)
    return pruned.total
