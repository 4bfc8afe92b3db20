"""Events and deliveries (docs/architecture.md, "Deliveries"): the tables, and publishing.

An event fans out to one delivery per active endpoint subscribed to its type. A delivery is
sent in attempts: claiming and recording them is ``models/attempts.py``; the log that reads
them back, and replay, ``models/delivery_log.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from functools import cache
from typing import Any, cast

from sqlalchemy import (
    JSON,
    ForeignKey,
    Index,
    Integer,
    Select,
    String,
    Table,
    Text,
    Update,
    bindparam,
    insert,
    select,
    update,
)
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship

from models import clock
from models.base import Base, IdMixin, UTCDateTime
from models.endpoint import WebhookEndpoint, get_endpoint
from models.errors import ValidationFailed
from models.events import SUBSCRIBABLE_EVENT_TYPES, SYSTEM_EVENT_TYPES, TEST_EVENT
from models.ids import new_event_id, new_id


class DeliveryKind(StrEnum):
    EVENT = "event"  # retried on the schedule
    TEST = "test"  # one attempt, sent synchronously
    PROBE = "probe"  # a safe migrate's test delivery: its operation decides when to try again


class DeliveryState(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    DEAD = "dead"
    ABANDONED = "abandoned"


class Outcome(StrEnum):
    SUCCESS = "success"
    RETRY = "retry"
    DEAD = "dead"


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (Index("ix_events_org_replay_created", "org_id", "replay_of", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_event_id)
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id"))
    type: Mapped[str] = mapped_column(String(64))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # The attempt this event re-sends (replays count against a per-organization rate limit).
    replay_of: Mapped[uuid.UUID | None] = mapped_column()


class Delivery(IdMixin, Base):
    __tablename__ = "deliveries"
    __table_args__ = (
        Index("ix_deliveries_state_next_attempt", "state", "next_attempt_at"),
        Index("ix_deliveries_endpoint_state", "endpoint_id", "state"),
        # Only deliveries being sent have a lease: counting what is in flight reads few rows.
        Index("ix_deliveries_leased_until", "leased_until"),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id"))
    event_id: Mapped[str] = mapped_column(ForeignKey("events.id"))
    endpoint_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("webhook_endpoints.id"))
    kind: Mapped[str] = mapped_column(String(16))
    # Declared so a flush inserts an event before the deliveries that reference it (without a
    # relationship the unit of work does not order the two tables). Never loaded.
    event: Mapped[Event] = relationship(lazy="raise")
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Set while an attempt is in flight (claimed, not yet recorded): the end of its lease.
    # Still set once the lease is over means the attempt's outcome was lost with its worker.
    leased_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class DeliveryAttempt(IdMixin, Base):
    """One row per attempt: what was sent (never a secret) and what came back."""

    __tablename__ = "delivery_attempts"
    __table_args__ = (
        Index("ix_delivery_attempts_org_occurred", "org_id", "occurred_at", "id"),
        Index("ix_delivery_attempts_delivery", "delivery_id"),
        Index("ix_delivery_attempts_outcome", "outcome"),  # /metrics counts by outcome
    )

    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id"))
    delivery_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("deliveries.id"))
    endpoint_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("webhook_endpoints.id"))
    event_id: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(String(2048))
    attempt: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(16))
    response_status: Mapped[int | None] = mapped_column(Integer)
    response_time_ms: Mapped[int] = mapped_column(Integer)
    request_body_sha256: Mapped[str] = mapped_column(String(64))
    request_body_bytes: Mapped[int] = mapped_column(Integer)
    response_body_excerpt: Mapped[str] = mapped_column(Text, default="")
    request_headers: Mapped[dict[str, str]] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(String(500))
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime)


# The tables themselves, for the multi-row INSERTs of the hot paths: Core skips the ORM's
# bulk-insert bookkeeping, which costs more than the statement on a 20-row batch.
DELIVERIES = cast(Table, Delivery.__table__)
ATTEMPTS = cast(Table, DeliveryAttempt.__table__)
EVENTS = cast(Table, Event.__table__)


# --- publishing -------------------------------------------------------------------------------


def check_event_type(event_type: Any, *, subscribable_only: bool) -> str | None:
    if not isinstance(event_type, str) or not event_type:
        return "is required"
    allowed = (
        SUBSCRIBABLE_EVENT_TYPES
        if subscribable_only
        else SUBSCRIBABLE_EVENT_TYPES | SYSTEM_EVENT_TYPES
    )
    if event_type not in allowed:
        return f"unknown event type: {event_type}"
    return None


@dataclass(frozen=True)
class NewDelivery:
    """A delivery ``publish`` recorded: pending, its first attempt due at once."""

    id: uuid.UUID
    endpoint_id: uuid.UUID


def publish(
    session: Session, org_id: uuid.UUID, event_type: str, data: Mapping[str, Any]
) -> tuple[Event, list[NewDelivery]]:
    """Record an event and one pending delivery per active endpoint subscribed to its type.

    The hot path of ``POST /v1/events``: the endpoints are read as two columns and the
    deliveries written in one multi-row ``INSERT`` (no ORM objects per endpoint or delivery).
    """
    problem = check_event_type(event_type, subscribable_only=True)
    if problem:
        raise ValidationFailed({"type": problem})
    event = new_event(session, org_id, event_type, data)
    subscribed = session.execute(
        select(WebhookEndpoint.id, WebhookEndpoint.events).where(
            WebhookEndpoint.org_id == org_id,
            WebhookEndpoint.deleted_at.is_(None),
            WebhookEndpoint.active.is_(True),
        )
    ).all()
    created = [
        NewDelivery(id=new_id(), endpoint_id=row.id)
        for row in subscribed
        if event_type in row.events
    ]
    if created:
        now = clock.now()
        session.execute(
            insert(DELIVERIES),
            [
                {
                    "id": item.id,
                    "org_id": org_id,
                    "event_id": event.id,
                    "endpoint_id": item.endpoint_id,
                    "kind": DeliveryKind.EVENT.value,
                    "state": DeliveryState.PENDING.value,
                    "attempts": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                    "updated_at": now,
                }
                for item in created
            ],
        )
    return event, created


def new_event(
    session: Session,
    org_id: uuid.UUID,
    event_type: str,
    data: Mapping[str, Any],
    *,
    replay_of: uuid.UUID | None = None,
) -> Event:
    event = Event(
        id=new_event_id(),
        org_id=org_id,
        type=event_type,
        data=dict(data),
        created_at=clock.now(),
        replay_of=replay_of,
    )
    session.add(event)
    # No relationship() ties deliveries to events, so the flush would not order the INSERTs
    # by the foreign key: write the event first.
    session.flush()
    return event


def new_delivery(
    session: Session, event: Event, endpoint_id: uuid.UUID, kind: DeliveryKind
) -> Delivery:
    now = clock.now()
    delivery = Delivery(
        id=new_id(),
        org_id=event.org_id,
        event_id=event.id,
        endpoint_id=endpoint_id,
        kind=kind,
        state=DeliveryState.PENDING,
        attempts=0,
        next_attempt_at=now,
        created_at=now,
        updated_at=now,
    )
    session.add(delivery)
    return delivery


def create_test_delivery(
    session: Session,
    org_id: uuid.UUID,
    endpoint_id: uuid.UUID,
    *,
    kind: DeliveryKind = DeliveryKind.TEST,
) -> Delivery:
    """A ``webhook.test`` event for one endpoint: sent once (test) or until accepted (probe)."""
    endpoint = get_endpoint(session, org_id, endpoint_id)
    event = new_event(
        session,
        org_id,
        TEST_EVENT,
        {"endpoint_id": str(endpoint.id), "message": "This is a test delivery from Rotator."},
    )
    delivery = new_delivery(session, event, endpoint.id, kind)
    session.flush()
    return delivery


def create_system_delivery(
    session: Session,
    org_id: uuid.UUID,
    endpoint_id: uuid.UUID,
    event_type: str,
    build_data: Callable[[str], Mapping[str, Any]],
) -> Delivery:
    """An event Rotator itself sends one endpoint (retried like any event); its data may
    depend on the event id (the handoff derives its key from it)."""
    event_id = new_event_id()
    event = Event(
        id=event_id,
        org_id=org_id,
        type=event_type,
        data=dict(build_data(event_id)),
        created_at=clock.now(),
    )
    session.add(event)
    session.flush()  # the event row before the delivery that references it (no relationship())
    delivery = new_delivery(session, event, endpoint_id, DeliveryKind.EVENT)
    session.flush()
    return delivery


def last_attempt(session: Session, delivery_id: uuid.UUID) -> DeliveryAttempt | None:
    return session.scalars(_last_attempt(), {"delivery_id": delivery_id}).one_or_none()


# Statements a safe migrate's steps run are built once: building one costs more CPU than
# running it (docs/performance.md, "Safe-migrate benchmark").
@cache
def _last_attempt() -> Select[DeliveryAttempt]:
    return (
        select(DeliveryAttempt)
        .where(DeliveryAttempt.delivery_id == bindparam("delivery_id"))
        .order_by(DeliveryAttempt.attempt.desc())
        .limit(1)
    )


def close_probe(session: Session, delivery_id: uuid.UUID) -> None:
    """A probe whose operation ended without success is dead: nothing will send it again."""
    session.execute(
        _end_pending(by_endpoint=False),
        {"row_id": delivery_id, "to": DeliveryState.DEAD, "now": clock.now()},
    )


def abandon_pending(session: Session, endpoint_id: uuid.UUID) -> None:
    """An endpoint that is deleted receives nothing more; its history stays."""
    params = {"row_id": endpoint_id, "to": DeliveryState.ABANDONED, "now": clock.now()}
    session.execute(_end_pending(by_endpoint=True), params)


@cache
def _end_pending(*, by_endpoint: bool) -> Update:
    """Pending deliveries (one, or an endpoint's) to the final state ``to``."""
    column = Delivery.endpoint_id if by_endpoint else Delivery.id
    return (
        update(Delivery)
        .where(column == bindparam("row_id"), Delivery.state == DeliveryState.PENDING)
        .values(
            state=bindparam("to"),
            next_attempt_at=None,
            leased_until=None,
            updated_at=bindparam("now"),
        )
    )


def overdue(session: Session, *, older_than: timedelta, limit: int = 500) -> list[uuid.UUID]:
    """Pending event deliveries whose next attempt is overdue: their message was lost."""
    cutoff = clock.now() - older_than
    return list(
        session.scalars(
            select(Delivery.id)
            .where(
                Delivery.state == DeliveryState.PENDING,
                Delivery.kind == DeliveryKind.EVENT,
                Delivery.next_attempt_at <= cutoff,
            )
            .order_by(Delivery.next_attempt_at)
            .limit(limit)
        )
    )
