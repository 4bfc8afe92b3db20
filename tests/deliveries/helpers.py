"""Shared setup for the delivery tests: endpoints, events and rows through the domain."""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler
from typing import Any

from sqlalchemy import select

from models import delivery as deliveries
from models.db import Database
from models.delivery import Delivery, DeliveryAttempt, Event
from models.endpoint import create_endpoint
from tests.receivers import Received, ScriptedReceiver, serving
from tests.support import overridden

RFC3339_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
EVENT_ID = re.compile(r"^evt_[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
MISSING_ID = "0190a1b2-0000-7000-8000-000000000000"


@dataclass(frozen=True)
class Hook:
    """An endpoint as its owner knows it: id, url and the secret shown once."""

    id: uuid.UUID
    url: str
    secret: str


def add_endpoint(
    database: Database,
    org_id: uuid.UUID,
    url: str,
    events: Sequence[str] = ("brand.vetted",),
) -> Hook:
    """An endpoint created through the domain (http:// loopback URLs allowed for the call)."""
    with overridden(database.settings, allow_insecure_urls=True), database.session() as session:
        created = create_endpoint(session, org_id, url=url, events=list(events))
        return Hook(id=created.endpoint.id, url=url, secret=created.secret)


def publish(
    database: Database,
    org_id: uuid.UUID,
    event_type: str = "brand.vetted",
    data: dict[str, Any] | None = None,
) -> tuple[str, list[uuid.UUID]]:
    """Publish through the domain; returns the event id and the new delivery ids."""
    with database.session() as session:
        event, created = deliveries.publish(session, org_id, event_type, data or {"brand": "b_1"})
        return event.id, [item.id for item in created]


def delivery(database: Database, delivery_id: uuid.UUID) -> Delivery:
    with database.session() as session:
        row = session.get(Delivery, delivery_id)
        assert row is not None, delivery_id
        return row


def event(database: Database, event_id: str) -> Event:
    with database.session() as session:
        row = session.get(Event, event_id)
        assert row is not None, event_id
        return row


def attempts_of(database: Database, delivery_id: uuid.UUID) -> list[DeliveryAttempt]:
    with database.session() as session:
        return list(
            session.scalars(
                select(DeliveryAttempt)
                .where(DeliveryAttempt.delivery_id == delivery_id)
                .order_by(DeliveryAttempt.attempt)
            )
        )


def all_rows(database: Database, model: Any) -> list[Any]:
    with database.session() as session:
        return list(session.scalars(select(model)))


def exactly(receiver: ScriptedReceiver, count: int) -> list[Received]:
    """The receiver's requests, once ``count`` have arrived and no more followed.

    It records a request only after answering it, so a sender can return first: wait.
    """
    if count:
        receiver.wait_for(count, timeout=10)
    time.sleep(0.1)
    received = list(receiver.received)
    assert len(received) == count, [r.event.get("id") for r in received]
    return received


def seconds_between(later: datetime | None, earlier: datetime) -> float:
    assert later is not None
    return (later - earlier).total_seconds()


def body_sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


@dataclass
class BigBodyReceiver:
    """Answers every POST with ``status`` and a large body, recording the request bodies."""

    status: int
    reply: bytes
    port: int = 0
    bodies: list[bytes] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/big"


@contextmanager
def big_body_receiver(status: int, reply: bytes) -> Iterator[BigBodyReceiver]:
    state = BigBodyReceiver(status=status, reply=reply)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's dispatch name
            length = int(self.headers.get("Content-Length", "0"))
            state.bodies.append(self.rfile.read(length))
            self.send_response(state.status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(state.reply)))
            self.end_headers()
            try:
                self.wfile.write(state.reply)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the sender stops reading after its excerpt

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return

    with serving(Handler) as port:
        state.port = port
        yield state
