"""Per-organization limits on work that holds resources while a receiver takes its time.

A synchronous test delivery (``POST /v1/webhooks/{id}/test``) holds a sending thread and an
HTTP request for as long as the receiver takes to answer, up to the delivery timeout. One
organization may have at most ``sync_tests_per_org`` of them in flight, counted in the
database so that the limit holds across every API process (docs/operating.md, Isolation).
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models import clock
from models.db import settings_of
from models.delivery import Delivery, DeliveryKind, DeliveryState, create_test_delivery
from models.endpoint import get_endpoint
from models.errors import RateLimited
from models.org import lock_org

# Beyond the delivery timeout, the time a test may take to be claimed after it is created and
# to be recorded after its request ends. A test still pending after the timeout and this much
# was abandoned by a process that died mid-request: it holds its organization's slot no longer.
IN_FLIGHT_GRACE_S = 5.0


def in_flight_window(session: Session) -> timedelta:
    """How long a pending test delivery counts as in flight after its last change."""
    return timedelta(seconds=settings_of(session).delivery_timeout_seconds + IN_FLIGHT_GRACE_S)


def count_in_flight(session: Session, org_id: uuid.UUID, now: datetime) -> tuple[int, datetime]:
    """The organization's test deliveries created or claimed and not yet recorded, within the
    window; and the oldest such change (``now`` when there is none)."""
    count, oldest = session.execute(
        select(func.count(), func.min(Delivery.updated_at)).where(
            Delivery.org_id == org_id,
            Delivery.kind == DeliveryKind.TEST,
            Delivery.state == DeliveryState.PENDING,
            Delivery.updated_at > now - in_flight_window(session),
        )
    ).one()
    return int(count), oldest or now


def start_test_delivery(session: Session, org_id: uuid.UUID, endpoint_id: uuid.UUID) -> Delivery:
    """A test delivery for the endpoint, unless the organization already has
    ``sync_tests_per_org`` in flight: then ``RateLimited``, and nothing is written.

    Counted under the organization lock, so concurrent requests (from any process) cannot
    both take the last slot. ``Retry-After`` is when the oldest test in flight stops counting
    at the latest (it usually ends sooner).
    """
    get_endpoint(session, org_id, endpoint_id)  # an unknown endpoint is 404, whatever the count
    lock_org(session, org_id)
    now = clock.now()
    count, oldest = count_in_flight(session, org_id, now)
    if count >= settings_of(session).sync_tests_per_org:
        free_at = oldest + in_flight_window(session)
        raise RateLimited(retry_after=math.ceil((free_at - now).total_seconds()))
    return create_test_delivery(session, org_id, endpoint_id)
