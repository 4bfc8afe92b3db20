"""Events, deliveries and the attempt log (CONTRACT §3).

An event fans out to one delivery per active endpoint subscribed to its type. A delivery is
sent in attempts; each attempt is claimed in one transaction (so a duplicate message does
nothing), sent outside any transaction, and recorded in another. The database decides what is
due: a lost message costs a reconciler tick, never a delivery.
"""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

from sqlalchemy import (
    JSON,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    select,
    update,
)
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship

from models import clock, org_secret
from models.base import Base, IdMixin, UTCDateTime
from models.db import settings_of
from models.endpoint import WebhookEndpoint, get_endpoint, signing_key
from models.errors import NotFound, RateLimited, ValidationFailed
from models.events import SUBSCRIBABLE_EVENT_TYPES, SYSTEM_EVENT_TYPES, TEST_EVENT
from models.ids import new_event_id, new_id
from models.org import lock_org
from models.pagination import Page, paginate
from receiver.signing import signature_headers

EXCERPT_CHARS = 2048
SIGNATURE_HEADERS = frozenset({"x-amcore-signature", "x-amcore-org-signature", "webhook-signature"})


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


@dataclass(frozen=True)
class AttemptPlan:
    """Everything one attempt sends, prepared inside the claiming transaction."""

    delivery_id: uuid.UUID
    org_id: uuid.UUID
    endpoint_id: uuid.UUID
    event_id: str
    event_type: str
    attempt: int
    url: str
    body: bytes
    headers: dict[str, str]


class AttemptResult(Protocol):
    """What the transport reports about one attempt (``workers.http.SendResult``)."""

    @property
    def status(self) -> int | None: ...
    @property
    def elapsed_ms(self) -> int: ...
    @property
    def body_excerpt(self) -> str: ...
    @property
    def error(self) -> str | None: ...
    @property
    def retry_after_s(self) -> float | None: ...
    @property
    def ok(self) -> bool: ...


@dataclass(frozen=True)
class Recorded:
    attempt: DeliveryAttempt
    retry_in: float | None  # seconds until the next attempt, when one is scheduled


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


def publish(
    session: Session, org_id: uuid.UUID, event_type: str, data: Mapping[str, Any]
) -> tuple[Event, list[Delivery]]:
    """Record an event and one pending delivery per active endpoint subscribed to its type."""
    problem = check_event_type(event_type, subscribable_only=True)
    if problem:
        raise ValidationFailed({"type": problem})
    event = _new_event(session, org_id, event_type, data)
    endpoints = session.scalars(
        select(WebhookEndpoint).where(
            WebhookEndpoint.org_id == org_id,
            WebhookEndpoint.deleted_at.is_(None),
            WebhookEndpoint.active.is_(True),
        )
    ).all()
    deliveries = [
        _new_delivery(session, event, endpoint.id, DeliveryKind.EVENT)
        for endpoint in endpoints
        if event_type in endpoint.events
    ]
    session.flush()
    return event, deliveries


def _new_event(
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


def _new_delivery(
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
    event = _new_event(
        session,
        org_id,
        TEST_EVENT,
        {"endpoint_id": str(endpoint.id), "message": "This is a test delivery from Rotator."},
    )
    delivery = _new_delivery(session, event, endpoint.id, kind)
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
    delivery = _new_delivery(session, event, endpoint_id, DeliveryKind.EVENT)
    session.flush()
    return delivery


def last_attempt(session: Session, delivery_id: uuid.UUID) -> DeliveryAttempt | None:
    return session.scalars(
        select(DeliveryAttempt)
        .where(DeliveryAttempt.delivery_id == delivery_id)
        .order_by(DeliveryAttempt.attempt.desc())
        .limit(1)
    ).one_or_none()


def close_probe(session: Session, delivery_id: uuid.UUID) -> None:
    """A probe whose operation ended without success is dead: nothing will send it again."""
    session.execute(
        update(Delivery)
        .where(Delivery.id == delivery_id, Delivery.state == DeliveryState.PENDING)
        .values(state=DeliveryState.DEAD, next_attempt_at=None, updated_at=clock.now())
    )


# --- one attempt ------------------------------------------------------------------------------


def envelope_bytes(event: Event, api_version: str) -> bytes:
    """The delivery body (CONTRACT "Signing"); identical across attempts of one delivery."""
    return json.dumps(
        {
            "id": event.id,
            "type": event.type,
            "api_version": api_version,
            "created_at": clock.rfc3339(event.created_at),
            "org_id": str(event.org_id),
            "data": event.data,
        },
        separators=(",", ":"),
        sort_keys=False,
    ).encode()


def claim(session: Session, delivery_id: uuid.UUID) -> AttemptPlan | None:
    """Claim the next attempt of a due delivery, or None when there is nothing to do.

    Returns None for a delivery that is finished, not yet due (a duplicate or early message),
    or whose endpoint is gone (the delivery is abandoned). The claim pushes ``next_attempt_at``
    a lease ahead, so a worker that dies mid-send is retried by the reconciler.
    """
    delivery = session.scalars(
        select(Delivery).where(Delivery.id == delivery_id).with_for_update()
    ).one_or_none()
    now = clock.now()
    if delivery is None or delivery.state != DeliveryState.PENDING:
        return None
    if delivery.next_attempt_at is not None and delivery.next_attempt_at > now + timedelta(
        seconds=1
    ):
        return None
    endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
    # Pausing stops deliveries, but a paused endpoint still exists: its test delivery is sent.
    paused = not endpoint.active and delivery.kind != DeliveryKind.TEST if endpoint else False
    if endpoint is None or endpoint.deleted_at is not None or paused:
        delivery.state = DeliveryState.ABANDONED
        delivery.updated_at = now
        return None
    event = session.get(Event, delivery.event_id)
    if event is None:  # pragma: no cover - foreign key guarantees it
        raise NotFound()
    settings = settings_of(session)
    delivery.attempts += 1
    delivery.next_attempt_at = now + timedelta(seconds=settings.delivery_timeout_seconds)
    delivery.updated_at = now
    body = envelope_bytes(event, endpoint.api_version)
    headers = {
        "Content-Type": "application/json",
        **signature_headers(
            endpoint_key=signing_key(session, endpoint),
            msg_id=event.id,
            timestamp=int(now.timestamp()),
            body=body,
            org_keys=org_secret.signing_keys(session, event.org_id),
        ),
    }
    return AttemptPlan(
        delivery_id=delivery.id,
        org_id=delivery.org_id,
        endpoint_id=endpoint.id,
        event_id=event.id,
        event_type=event.type,
        attempt=delivery.attempts,
        url=endpoint.url,
        body=body,
        headers=headers,
    )


def retry_delay(
    schedule: Sequence[float], attempt: int, retry_after_s: float | None, jitter: float
) -> float | None:
    """Seconds before the attempt after ``attempt`` (1-based), or None when the schedule is spent.

    ``Retry-After`` (on 429/503) is honoured within bounds: never sooner than the schedule's
    own step, never later than its longest.
    """
    if attempt > len(schedule):
        return None
    delay = schedule[attempt - 1] * (1 + random.uniform(-jitter, jitter))  # noqa: S311
    if retry_after_s is not None:
        # A floor after jitter: never retry before the receiver asked (capped at the longest step).
        delay = max(delay, min(retry_after_s, max(schedule)))
    return delay


def recorded_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Headers as logged: signature values are redacted (they are derived from secrets)."""
    out = {}
    for name, value in headers.items():
        if name.lower() in SIGNATURE_HEADERS:
            out[name] = "[redacted]"
        else:
            out[name] = value
    return out


def record(session: Session, plan: AttemptPlan, result: AttemptResult) -> Recorded:
    """Log the attempt and move the delivery on: succeeded, retry later, or dead."""
    delivery = session.scalars(
        select(Delivery).where(Delivery.id == plan.delivery_id).with_for_update()
    ).one()
    settings = settings_of(session)
    now = clock.now()
    retry_in: float | None = None
    if result.ok:
        outcome = Outcome.SUCCESS
    elif delivery.kind == DeliveryKind.PROBE and delivery.state == DeliveryState.PENDING:
        outcome = Outcome.RETRY
    elif delivery.kind == DeliveryKind.EVENT and delivery.state == DeliveryState.PENDING:
        retry_in = retry_delay(
            settings.delivery_retry_schedule,
            plan.attempt,
            result.retry_after_s,
            settings.delivery_retry_jitter,
        )
        outcome = Outcome.DEAD if retry_in is None else Outcome.RETRY
    else:
        outcome = Outcome.DEAD
    if delivery.state == DeliveryState.PENDING:
        if retry_in is not None:
            delivery.next_attempt_at = now + timedelta(seconds=retry_in)
        elif outcome == Outcome.RETRY:  # a probe: due whenever its operation says
            delivery.next_attempt_at = None
        else:
            delivery.next_attempt_at = None
            delivery.state = (
                DeliveryState.SUCCEEDED if outcome == Outcome.SUCCESS else DeliveryState.DEAD
            )
        delivery.updated_at = now
    attempt = DeliveryAttempt(
        id=new_id(),
        org_id=plan.org_id,
        delivery_id=plan.delivery_id,
        endpoint_id=plan.endpoint_id,
        event_id=plan.event_id,
        event_type=plan.event_type,
        url=plan.url,
        attempt=plan.attempt,
        outcome=outcome,
        response_status=result.status,
        response_time_ms=result.elapsed_ms,
        request_body_sha256=hashlib.sha256(plan.body).hexdigest(),
        request_body_bytes=len(plan.body),
        response_body_excerpt=result.body_excerpt[:EXCERPT_CHARS],
        request_headers=recorded_headers(plan.headers),
        error=result.error[:500] if result.error else None,
        occurred_at=now,
    )
    session.add(attempt)
    session.flush()
    return Recorded(attempt=attempt, retry_in=retry_in)


def abandon_pending(session: Session, endpoint_id: uuid.UUID) -> None:
    """An endpoint that is deleted receives nothing more; its history stays."""
    session.execute(
        update(Delivery)
        .where(Delivery.endpoint_id == endpoint_id, Delivery.state == DeliveryState.PENDING)
        .values(state=DeliveryState.ABANDONED, next_attempt_at=None, updated_at=clock.now())
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


# --- the log ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttemptFilter:
    endpoint_id: uuid.UUID | None = None
    event_type: str | None = None
    outcome: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    http_status_min: int | None = None
    http_status_max: int | None = None

    def validate(self) -> None:
        problems: dict[str, str] = {}
        if self.event_type is not None:
            problem = check_event_type(self.event_type, subscribable_only=False)
            if problem:
                problems["event_type"] = problem
        if self.outcome is not None and self.outcome not in {o.value for o in Outcome}:
            problems["outcome"] = "must be one of success, retry, dead"
        if (
            self.http_status_min is not None
            and self.http_status_max is not None
            and self.http_status_min > self.http_status_max
        ):
            problems["http_status_min"] = "must not exceed http_status_max"
        if self.since and self.until and self.since > self.until:
            problems["since"] = "must not be after until"
        if problems:
            raise ValidationFailed(problems)


def list_attempts(
    session: Session,
    org_id: uuid.UUID,
    *,
    filters: AttemptFilter,
    limit: int,
    cursor: str | None,
) -> Page[DeliveryAttempt]:
    filters.validate()
    query = select(DeliveryAttempt).where(DeliveryAttempt.org_id == org_id)
    if filters.endpoint_id:
        query = query.where(DeliveryAttempt.endpoint_id == filters.endpoint_id)
    if filters.event_type:
        query = query.where(DeliveryAttempt.event_type == filters.event_type)
    if filters.outcome:
        query = query.where(DeliveryAttempt.outcome == filters.outcome)
    if filters.since:
        query = query.where(DeliveryAttempt.occurred_at >= filters.since)
    if filters.until:
        query = query.where(DeliveryAttempt.occurred_at <= filters.until)
    if filters.http_status_min is not None:
        query = query.where(DeliveryAttempt.response_status >= filters.http_status_min)
    if filters.http_status_max is not None:
        query = query.where(DeliveryAttempt.response_status <= filters.http_status_max)
    return paginate(
        session,
        query,
        created_at=DeliveryAttempt.occurred_at,
        id_column=DeliveryAttempt.id,
        limit=limit,
        cursor=cursor,
    )


def get_attempt(session: Session, org_id: uuid.UUID, attempt_id: uuid.UUID) -> DeliveryAttempt:
    attempt = session.scalars(
        select(DeliveryAttempt).where(
            DeliveryAttempt.id == attempt_id, DeliveryAttempt.org_id == org_id
        )
    ).one_or_none()
    if attempt is None:
        raise NotFound()
    return attempt


@dataclass(frozen=True)
class Replay:
    source: DeliveryAttempt
    event: Event
    delivery: Delivery


def replay(session: Session, org_id: uuid.UUID, attempt_id: uuid.UUID) -> Replay:
    """Re-send an attempt's event data to its endpoint under a fresh event id (rate-limited)."""
    source = get_attempt(session, org_id, attempt_id)
    lock_org(session, org_id)
    now = clock.now()
    window_start = now - timedelta(minutes=1)
    recent = session.scalars(
        select(Event.created_at)
        .where(
            Event.org_id == org_id, Event.replay_of.is_not(None), Event.created_at > window_start
        )
        .order_by(Event.created_at)
    ).all()
    if len(recent) >= settings_of(session).replay_limit_per_minute:
        wait = (recent[0] + timedelta(minutes=1) - now).total_seconds()
        raise RateLimited(retry_after=int(wait) + 1)
    get_endpoint(session, org_id, source.endpoint_id)  # deleted endpoints are not replayed to
    original = session.get(Event, source.event_id)
    if original is None:  # pragma: no cover - attempts always reference a stored event
        raise NotFound()
    event = _new_event(session, org_id, original.type, original.data, replay_of=source.id)
    kind = DeliveryKind.EVENT
    delivery = _new_delivery(session, event, source.endpoint_id, kind)
    session.flush()
    return Replay(source=source, event=event, delivery=delivery)
