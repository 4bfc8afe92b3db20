"""What every sender of deliveries shares: a keep-alive ``Sender`` per thread, and the one
log line and latency observation per attempt."""

from __future__ import annotations

import logging
import threading

from models import delivery as deliveries
from models.db import Database
from rotator import metrics
from workers.http import Sender

log = logging.getLogger("rotator.deliveries")

# Keep-alive connections per thread (a thread sends one request at a time; the rest are idle
# connections to other receivers, closed after 5 s or when a new one needs room).
CONNECTIONS_PER_THREAD = 4

_local = threading.local()


def sender_for(db: Database) -> Sender:
    """This thread's keep-alive client for the database's settings (made on first use, so
    after a prefork worker forks). One per thread, not one shared by a process's threads: a
    shared client serialises them on its pool lock and scans every pooled connection per
    request, which cost a third more CPU per delivery than this."""
    settings = db.settings
    key = (
        settings.delivery_timeout_seconds,
        settings.allow_insecure_urls,
        tuple(settings.allowed_private_networks),
    )
    senders: dict[tuple[object, ...], Sender] | None = getattr(_local, "senders", None)
    if senders is None:
        senders = _local.senders = {}
    sender = senders.get(key)
    if sender is None:
        sender = senders[key] = Sender.from_settings(
            settings, max_connections=CONNECTIONS_PER_THREAD
        )
    return sender


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
