"""Synchronous tests in flight per organization (``models.limits``), counted in the database."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from models import clock
from models.delivery import Delivery, DeliveryState, Event
from models.errors import NotFound, RateLimited
from models.limits import IN_FLIGHT_GRACE_S, count_in_flight, start_test_delivery
from tests.deliveries.helpers import MISSING_ID, add_endpoint
from tests.factories import make_tenant
from tests.support import overridden

LIMIT = 2
TIMEOUT_S = 4.0
WINDOW = timedelta(seconds=TIMEOUT_S + IN_FLIGHT_GRACE_S)


@pytest.fixture
def limited(settings):
    with overridden(settings, sync_tests_per_org=LIMIT, delivery_timeout_seconds=TIMEOUT_S):
        yield settings


def start(database, org_id, endpoint_id):
    with database.session() as session:
        return start_test_delivery(session, org_id, endpoint_id)


def counts(database) -> tuple[int, int]:
    with database.session() as session:
        return (
            session.scalar(select(func.count()).select_from(Event)),
            session.scalar(select(func.count()).select_from(Delivery)),
        )


def test_beyond_the_limit_is_rate_limited_until_the_oldest_stops_counting(database, limited):
    tenant = make_tenant(database)
    other = make_tenant(database, name="Other")
    hook = add_endpoint(database, tenant.org_id, "https://hooks.example.com/a")
    theirs = add_endpoint(database, other.org_id, "https://hooks.example.com/b")
    start(database, tenant.org_id, hook.id)
    clock.travel(timedelta(seconds=2))
    start(database, tenant.org_id, hook.id)
    before = counts(database)
    with pytest.raises(RateLimited) as refused:
        start(database, tenant.org_id, hook.id)
    # The oldest stops counting WINDOW after it was made, 2 s ago.
    assert refused.value.retry_after == int(WINDOW.total_seconds()) - 2
    assert counts(database) == before  # nothing written
    start(database, other.org_id, theirs.id)  # per organization

    # Requests that died before recording their test hold their slots only for the window.
    clock.travel(WINDOW - timedelta(seconds=2) + timedelta(milliseconds=10))
    start(database, tenant.org_id, hook.id)
    with pytest.raises(RateLimited):
        start(database, tenant.org_id, hook.id)


def test_finished_tests_do_not_count(database, limited):
    tenant = make_tenant(database)
    hook = add_endpoint(database, tenant.org_id, "https://hooks.example.com/a")
    made = [start(database, tenant.org_id, hook.id) for _ in range(LIMIT)]
    with database.session() as session:
        assert count_in_flight(session, tenant.org_id, clock.now())[0] == LIMIT
        for state in (DeliveryState.SUCCEEDED, DeliveryState.DEAD):
            row = session.get(Delivery, made.pop().id)
            assert row is not None
            row.state = state
    with database.session() as session:
        assert count_in_flight(session, tenant.org_id, clock.now())[0] == 0
    for _ in range(LIMIT):
        start(database, tenant.org_id, hook.id)


def test_an_unknown_endpoint_is_404_whatever_the_count(database, limited):
    tenant = make_tenant(database)
    hook = add_endpoint(database, tenant.org_id, "https://hooks.example.com/a")
    for _ in range(LIMIT):
        start(database, tenant.org_id, hook.id)
    with pytest.raises(NotFound):
        start(database, tenant.org_id, uuid.UUID(MISSING_ID))
