"""What every sender of deliveries shares: keep-alive ``Sender``s (one per thread for callers
that send now and then, a pool by receiver for the dispatcher), and the one log line and
latency observation per attempt."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from urllib.parse import urlsplit

from models import attempts
from models import delivery as deliveries
from models.db import Database
from rotator import metrics
from rotator.settings import Settings
from workers.http import Sender, SendResult

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


class SenderPool:
    """Keep-alive senders lent by receiver, one request at a time.

    The dispatcher's posting threads take any delivery, to any receiver; a sender kept per
    thread would hold a connection to only a few of them and open a new one for most requests.
    Here a request borrows an idle sender whose one connection already goes to its URL's
    origin (scheme, host, port), or a new one, and gives it back afterwards: a receiver keeps
    as many open connections as it had requests in flight at once (at most
    ROTATOR_ENDPOINT_MAX_IN_FLIGHT per endpoint), and each is reused. At most ``idle_max``
    senders stay idle; beyond that the least recently used are closed.
    """

    def __init__(self, settings: Settings, *, idle_max: int) -> None:
        self._settings = settings
        self._idle_max = max(1, idle_max)
        self._lock = threading.Lock()
        self._idle: OrderedDict[str, list[Sender]] = OrderedDict()
        self._idle_count = 0

    def post(self, url: str, body: bytes, headers: dict[str, str]) -> SendResult:
        """``Sender.post`` on a sender to ``url``'s origin; never raises."""
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}".lower()
        sender = self._borrow(origin)
        try:
            return sender.post(url, body, headers)
        finally:
            self._give_back(origin, sender)

    def close(self) -> None:
        """Close every idle sender (borrowed ones are closed when given back)."""
        with self._lock:
            idle = [sender for senders in self._idle.values() for sender in senders]
            self._idle.clear()
            self._idle_count = 0
            self._idle_max = 0
        for sender in idle:
            sender.close()

    def _borrow(self, origin: str) -> Sender:
        with self._lock:
            senders = self._idle.get(origin)
            if senders:
                self._idle_count -= 1
                sender = senders.pop()
                if not senders:
                    del self._idle[origin]
                return sender
        return Sender.from_settings(self._settings, max_connections=1)

    def _give_back(self, origin: str, sender: Sender) -> None:
        evicted: list[Sender] = []
        with self._lock:
            self._idle.setdefault(origin, []).append(sender)
            self._idle.move_to_end(origin)
            self._idle_count += 1
            while self._idle_count > self._idle_max:
                oldest, senders = next(iter(self._idle.items()))
                evicted.append(senders.pop(0))
                self._idle_count -= 1
                if not senders:
                    del self._idle[oldest]
        for stale in evicted:
            stale.close()


def report_attempt(db: Database, row: deliveries.DeliveryAttempt | attempts.LoggedAttempt) -> None:
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
