"""Sending deliveries: claim attempts, sign and send them with httpx, record the outcomes.

One ``delivery.send`` message carries the ids of several deliveries (an event's fan-out, a
reconciler's batch, or one retry). The task claims the due ones in one transaction, sends them
all at once on the process's posting threads, each with its own keep-alive ``Sender`` (no
transaction, lock or database connection held meanwhile), and records them in a second
transaction.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from sqlalchemy.orm import Session

from models import delivery as deliveries
from models.db import Database, get_database
from rotator import metrics
from workers.app import app
from workers.enqueue import send_after_commit
from workers.http import Sender, SendResult
from workers.names import TaskName

log = logging.getLogger("rotator.deliveries")

# Retries further out than this are not held as countdown messages in the broker; the
# reconciler picks them up when due (DESIGN: countdowns in seconds to minutes only).
MAX_COUNTDOWN_S = 900.0

# Deliveries per message. A message's posts all run at once (one posting thread each), so a
# message takes about one request's time (at most ~2 timeouts: connect, then read) whatever
# its size: well inside the task time limit, and a member's record never waits long enough
# behind a slow batch-mate for its lease to run out and the reconciler to send it again.
BATCH_SIZE = 20
# Posting threads per process, created only as needed: one batch at a time in a prefork child
# uses BATCH_SIZE of them; a threads-pool worker running several batches at once uses more.
MAX_POSTING_THREADS = 4 * BATCH_SIZE
# Keep-alive connections per posting thread (a thread sends one request at a time; the rest
# are idle connections to other receivers, closed after 5 s or when a new one needs room).
CONNECTIONS_PER_THREAD = 4

_local = threading.local()


def sender_for(db: Database) -> Sender:
    """This thread's keep-alive client for the database's settings (made on first use, so
    after a prefork worker forks). One per thread, not one shared by a process's threads: a
    shared client serialises them on its pool lock and scans every pooled connection per
    request, which cost a third more CPU per delivery than this."""
    settings = db.settings
    key = (settings.delivery_timeout_seconds, settings.allow_insecure_urls)
    senders: dict[tuple[float, bool], Sender] | None = getattr(_local, "senders", None)
    if senders is None:
        senders = _local.senders = {}
    sender = senders.get(key)
    if sender is None:
        sender = senders[key] = Sender.from_settings(
            settings, max_connections=CONNECTIONS_PER_THREAD
        )
    return sender


_pool_lock = threading.Lock()
_pool: tuple[int, ThreadPoolExecutor] | None = None


def _posting_pool() -> ThreadPoolExecutor:
    """The process's posting threads, created on first use (after a prefork worker forks)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (
                os.getpid(),
                ThreadPoolExecutor(
                    max_workers=MAX_POSTING_THREADS, thread_name_prefix="delivery-post"
                ),
            )
        return _pool[1]


def _post(db: Database, plan: deliveries.AttemptPlan) -> SendResult:
    return sender_for(db).post(plan.url, plan.body, plan.headers)


def enqueue(session: Session, delivery_ids: Iterable[uuid.UUID]) -> None:
    """Send these deliveries once ``session`` commits: one message per ``BATCH_SIZE`` ids."""
    ids = list(delivery_ids)
    for start in range(0, len(ids), BATCH_SIZE):
        send_after_commit(session, TaskName.DELIVERY_SEND, *ids[start : start + BATCH_SIZE])


def send(db: Database, delivery_ids: Sequence[uuid.UUID]) -> list[deliveries.DeliveryAttempt]:
    """Send the next attempt of each due delivery among ``delivery_ids``; the attempts made.

    Deliveries that are not due (a duplicate or early message), finished, or whose endpoint is
    gone are skipped. Retries due within ``MAX_COUNTDOWN_S`` get their own countdown message.
    """
    with db.session() as session:
        plans = deliveries.claim_many(session, delivery_ids)
    if not plans:
        return []
    if len(plans) == 1:
        results = [_post(db, plans[0])]
    else:
        results = list(_posting_pool().map(partial(_post, db), plans))
    with db.session() as session:
        recorded = deliveries.record_many(session, list(zip(plans, results, strict=True)))
        for item in recorded:
            if item.retry_in is not None and item.retry_in <= MAX_COUNTDOWN_S:
                send_after_commit(
                    session,
                    TaskName.DELIVERY_SEND,
                    item.attempt.delivery_id,
                    countdown=item.retry_in,
                )
    for item in recorded:
        report_attempt(db, item.attempt)
    return [item.attempt for item in recorded]


def attempt(db: Database, delivery_id: uuid.UUID) -> deliveries.DeliveryAttempt | None:
    """Send the next attempt of ``delivery_id`` if it is due; None when there was nothing to do.

    ``send`` for one delivery: the test route and a safe migrate's probe call it directly.
    """
    made = send(db, [delivery_id])
    return made[0] if made else None


def report_attempt(db: Database, row: deliveries.DeliveryAttempt) -> None:
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
def send_deliveries(*delivery_ids: str) -> None:
    """``delivery.send(id, id, …)``: ids only, never anything secret (invariant 1)."""
    send(get_database(), [uuid.UUID(value) for value in delivery_ids])
