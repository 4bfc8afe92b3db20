"""The delivery log operators and customers read (docs/api.md, "Delivery log and replay"):
every attempt, filtered and paged, and replaying one under a fresh event id."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import clock
from models.db import settings_of
from models.delivery import (
    Delivery,
    DeliveryAttempt,
    DeliveryKind,
    Event,
    Outcome,
    check_event_type,
    new_delivery,
    new_event,
)
from models.endpoint import get_endpoint
from models.errors import NotFound, RateLimited, ValidationFailed
from models.org import lock_org
from models.pagination import Page, paginate


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
    event = new_event(session, org_id, original.type, original.data, replay_of=source.id)
    kind = DeliveryKind.EVENT
    delivery = new_delivery(session, event, source.endpoint_id, kind)
    session.flush()
    return Replay(source=source, event=event, delivery=delivery)
