"""Deliveries: the ``delivery.send`` wake-up message, and the direct path for one delivery.

Event deliveries are sent by the data plane's dispatcher (workers/dispatcher.py), which takes
them from the database fairly; a ``delivery.send`` message only tells a delivery worker that
there is work. It carries no ids, and losing one costs at most the dispatcher's idle poll.

A synchronous test delivery and a handoff go the direct way: ``attempt`` claims that one
delivery, sends it on the calling thread (no transaction, lock or database connection held
meanwhile) and records it in a second transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from celery import signals
from sqlalchemy.orm import Session

from models import attempts
from models import delivery as deliveries
from models.db import Database, get_database
from workers import dispatcher
from workers.app import DELIVERY_QUEUE, app
from workers.enqueue import send_after_commit
from workers.names import TaskName
from workers.sending import report_attempt, sender_for


def enqueue(session: Session, delivery_ids: Sequence[uuid.UUID]) -> None:
    """Wake a delivery worker once ``session`` commits, if it made deliveries due."""
    if delivery_ids:
        send_after_commit(session, TaskName.DELIVERY_SEND)


def send(db: Database, delivery_ids: Sequence[uuid.UUID]) -> list[deliveries.DeliveryAttempt]:
    """Send the next attempt of each due delivery among ``delivery_ids``, one after another on
    this thread; the attempts made.

    Deliveries that are not due (a duplicate or early call), finished, or whose endpoint is
    gone are skipped. A retry is left to the dispatcher, which finds it due in the database.
    """
    with db.session() as session:
        plans = attempts.claim_many(session, delivery_ids)
    if not plans:
        return []
    sent = [(plan, sender_for(db).post(plan.url, plan.body, plan.headers)) for plan in plans]
    with db.session() as session:
        recorded = attempts.record_many(session, sent)
    for item in recorded:
        report_attempt(db, item.attempt)
    return [item.attempt for item in recorded]


def attempt(db: Database, delivery_id: uuid.UUID) -> deliveries.DeliveryAttempt | None:
    """Send the next attempt of ``delivery_id`` if it is due; None when there was nothing to do.

    The test route and a safe migrate's handoff call it directly.
    """
    made = send(db, [delivery_id])
    return made[0] if made else None


@app.task(name=TaskName.DELIVERY_SEND)
def wake_dispatcher(*_legacy_ids: str) -> None:
    """``delivery.send``: there are due deliveries. Messages published before the dispatcher
    existed carried delivery ids; they wake it just the same."""
    dispatcher.running(get_database()).wake()


# A worker consuming the deliveries queue runs one dispatcher per process that executes tasks:
# each prefork child, or the worker process itself for the solo and threads pools.


def _consumes_deliveries() -> bool:
    return DELIVERY_QUEUE in app.amqp.queues.consume_from


@signals.worker_process_init.connect
def _start_in_child(**_: Any) -> None:
    if _consumes_deliveries():
        dispatcher.running(get_database())


@signals.worker_ready.connect
def _start_in_worker(sender: Any = None, **_: Any) -> None:
    pool = getattr(sender, "pool", None)
    forks = type(pool).__module__.startswith("celery.concurrency.prefork")
    if not forks and _consumes_deliveries():
        dispatcher.running(get_database())


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _stop(**_: Any) -> None:
    dispatcher.stop_running()
