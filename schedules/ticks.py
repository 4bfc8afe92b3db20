"""Periodic ticks run by beat: each re-derives its work from the database."""

from __future__ import annotations

import logging
from datetime import timedelta

from models import delivery as deliveries
from models import org_secret
from models.db import get_database
from workers.app import app
from workers.enqueue import send_after_commit
from workers.names import TaskName

log = logging.getLogger("rotator.schedules")

# A pending delivery overdue by more than this lost its message (or its worker): send again.
DELIVERY_OVERDUE = timedelta(seconds=30)


@app.task(name=TaskName.DELIVERY_RECONCILE)
def reconcile_deliveries() -> int:
    with get_database().session() as session:
        due = deliveries.overdue(session, older_than=DELIVERY_OVERDUE)
        for delivery_id in due:
            send_after_commit(session, TaskName.DELIVERY_SEND, delivery_id)
    if due:
        log.info("re-enqueued %d overdue deliveries", len(due))
    return len(due)


@app.task(name=TaskName.ORG_SECRET_SWEEP)
def sweep_org_secrets() -> int:
    with get_database().session() as session:
        lags = org_secret.sweep(session)
    if lags:
        log.info("expired %d org secrets, max lag %.1fs", len(lags), max(lags))
    return len(lags)
