"""Sending deliveries: claim an attempt, sign and send it with httpx, record the outcome."""

from __future__ import annotations

import logging
import uuid
from functools import cache

from models import delivery as deliveries
from models.db import Database, get_database
from rotator import metrics
from workers.app import app
from workers.enqueue import send_after_commit
from workers.http import Sender
from workers.names import TaskName

log = logging.getLogger("rotator.deliveries")

# Retries further out than this are not held as countdown messages in the broker; the
# reconciler picks them up when due (DESIGN: countdowns in seconds to minutes only).
MAX_COUNTDOWN_S = 900.0


@cache
def _sender(timeout_s: float, allow_insecure: bool) -> Sender:
    return Sender(timeout_s=timeout_s, allow_insecure=allow_insecure)


def sender_for(db: Database) -> Sender:
    """One keep-alive client per process and configuration (created after a worker forks)."""
    settings = db.settings
    return _sender(settings.delivery_timeout_seconds, settings.allow_insecure_urls)


def attempt(db: Database, delivery_id: uuid.UUID) -> deliveries.DeliveryAttempt | None:
    """Send the next attempt of ``delivery_id`` if it is due; None when there was nothing to do.

    The claim and the record are two short transactions; the HTTP request runs between them,
    holding no lock and no connection.
    """
    with db.session() as session:
        plan = deliveries.claim(session, delivery_id)
    if plan is None:
        return None
    result = sender_for(db).post(plan.url, plan.body, plan.headers)
    with db.session() as session:
        recorded = deliveries.record(session, plan, result)
        if recorded.retry_in is not None and recorded.retry_in <= MAX_COUNTDOWN_S:
            send_after_commit(
                session, TaskName.DELIVERY_SEND, delivery_id, countdown=recorded.retry_in
            )
    _report(db, recorded.attempt)
    return recorded.attempt


def _report(db: Database, row: deliveries.DeliveryAttempt) -> None:
    """One log line and one latency observation per attempt: ids and numbers, never the URL,
    headers or body (a URL may carry a credential)."""
    metrics.observe_delivery(db.settings, row.outcome, row.response_time_ms / 1000)
    log.info(
        "delivery attempt",
        extra={
            "delivery_id": str(row.delivery_id),
            "attempt": row.attempt,
            "outcome": row.outcome,
            "status": row.response_status,
            "latency_ms": row.response_time_ms,
        },
    )


@app.task(name=TaskName.DELIVERY_SEND)
def send_delivery(delivery_id: str) -> None:
    attempt(get_database(), uuid.UUID(delivery_id))
