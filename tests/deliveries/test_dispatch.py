"""The data plane takes work fairly: ``claim_due`` ranks by what each organization and endpoint
already has in flight, caps both, skips endpoints whose circuit is open; the dispatcher claims
only as much as it has free posting slots.

Claims here are real transactions on the pass's database; the dispatcher test sends to real
loopback receivers on its own threads. No Celery worker runs.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
from sqlalchemy import func, select

from models import attempts, circuit, clock
from models import delivery as deliveries
from models.circuit import EndpointCircuit
from models.delivery import Delivery, DeliveryState, Outcome
from tests.deliveries.helpers import add_endpoint, attempts_of, delivery, publish
from tests.factories import make_tenant
from tests.receivers import scripted_receiver, serving
from tests.support import overridden
from workers.deliveries import attempt
from workers.dispatcher import Dispatcher


@pytest.fixture
def plane(settings):
    """Loopback receivers, no retry waits, small caps that the tests can reach."""
    with overridden(
        settings,
        allow_insecure_urls=True,
        delivery_retry_schedule=[60.0, 60.0],
        delivery_retry_jitter=0.0,
        endpoint_max_in_flight=2,
        org_max_in_flight=5,
        circuit_failure_threshold=3,
        circuit_open_seconds=30.0,
        circuit_max_open_seconds=100.0,
    ) as changed:
        yield changed


def _backlog(database, org_id, urls, events):
    """``events`` events to one endpoint per url; the delivery ids by endpoint."""
    hooks = [add_endpoint(database, org_id, url) for url in urls]
    for _ in range(events):
        publish(database, org_id)
    by_endpoint: dict[uuid.UUID, list[uuid.UUID]] = {hook.id: [] for hook in hooks}
    with database.session() as session:
        for row in session.execute(
            select(Delivery.id, Delivery.endpoint_id)
            .where(Delivery.org_id == org_id)
            .order_by(Delivery.created_at, Delivery.id)
        ):
            by_endpoint[row.endpoint_id].append(row.id)
    return hooks, by_endpoint


def _claim(database, limit):
    with database.session() as session:
        return attempts.claim_due(session, limit)


def _in_flight(database) -> int:
    with database.session() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(Delivery)
                .where(Delivery.leased_until > clock.now())
            )
            or 0
        )


def test_a_backlog_never_queues_another_organization_behind_it(database, plane):
    busy, quiet = make_tenant(database, name="Busy"), make_tenant(database, name="Quiet")
    _backlog(database, busy.org_id, ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"], 20)
    (_, [late]) = publish_one(database, quiet.org_id, "http://127.0.0.1:9/q")
    plans = _claim(database, 2)
    # The quiet organization's one delivery, though 40 older ones are due, comes first.
    assert late in [plan.delivery_id for plan in plans]


def publish_one(database, org_id, url):
    add_endpoint(database, org_id, url)
    return publish(database, org_id)


def test_caps_hold_per_endpoint_and_per_organization_across_claims(database, plane):
    tenant = make_tenant(database)
    urls = [f"http://127.0.0.1:9/{index}" for index in range(4)]
    _, by_endpoint = _backlog(database, tenant.org_id, urls, 5)
    first = _claim(database, 100)
    per_endpoint = Counter(plan.endpoint_id for plan in first)
    # Round robin over the endpoints up to the organization's cap of 5, each endpoint ≤ 2.
    assert len(first) == plane.org_max_in_flight
    assert max(per_endpoint.values()) <= plane.endpoint_max_in_flight
    assert len(per_endpoint) == 4
    # While those are in flight nothing more is taken for this organization.
    assert _claim(database, 100) == []
    assert _in_flight(database) == 5
    # Two finish: exactly two more may go, never to an endpoint already at its cap.
    sent = [(plan, _Result(200)) for plan in first[:2]]
    with database.session() as session:
        attempts.record_many(session, sent)
    second = _claim(database, 100)
    assert len(second) == 2
    counts = Counter(plan.endpoint_id for plan in first[2:] + second)
    assert max(counts.values()) <= plane.endpoint_max_in_flight
    assert sum(len(ids) for ids in by_endpoint.values()) == 20


def test_within_an_organization_endpoints_take_turns(database, plane):
    tenant = make_tenant(database)
    with overridden(plane, org_max_in_flight=100, endpoint_max_in_flight=100):
        hooks, _ = _backlog(
            database, tenant.org_id, ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"], 10
        )
        plans = _claim(database, 4)
    # Two from each endpoint, not the four oldest (which may all belong to one endpoint).
    assert Counter(plan.endpoint_id for plan in plans) == {hooks[0].id: 2, hooks[1].id: 2}


def test_an_expired_lease_frees_its_slot_and_the_attempt_is_logged_lost(database, plane):
    tenant = make_tenant(database)
    _, by_endpoint = _backlog(database, tenant.org_id, ["http://127.0.0.1:9/a"], 3)
    taken = _claim(database, 100)
    assert len(taken) == 2  # the endpoint's cap
    assert _claim(database, 100) == []
    clock.travel(timedelta(seconds=2 * plane.delivery_timeout_seconds + 6))
    again = _claim(database, 100)
    assert len(again) == 2
    assert _in_flight(database) == 2
    lost = [plan for plan in again if plan.attempt == 2]
    for plan in lost:
        (row,) = attempts_of(database, plan.delivery_id)
        assert (row.attempt, row.outcome, row.error) == (1, "retry", attempts.LOST_ATTEMPT)


class _Result:
    """What a real ``SendResult`` reports, for outcomes the receivers need not be asked for."""

    def __init__(self, status: int | None, error: str | None = None) -> None:
        self.status = status
        self.elapsed_ms = 1
        self.body_excerpt = ""
        self.error = error
        self.retry_after_s = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def _fail(database, plans, status=None):
    with database.session() as session:
        return attempts.record_many(
            session, [(plan, _Result(status, None if status else "timeout")) for plan in plans]
        )


def test_a_receiver_that_keeps_failing_opens_its_circuit_without_spending_retries(database, plane):
    tenant = make_tenant(database)
    hooks, by_endpoint = _backlog(database, tenant.org_id, ["http://127.0.0.1:9/down"], 4)
    (down,) = hooks
    for failures in range(plane.circuit_failure_threshold):
        if failures:
            clock.travel(timedelta(seconds=1))
        plans = _claim(database, 1)
        assert len(plans) == 1
        recorded = _fail(database, plans)
    # The third failure in a row opened the circuit, and the log says so.
    assert "circuit open until" in (recorded[0].attempt.error or "")
    with database.session() as session:
        row = session.get(EndpointCircuit, down.id)
        assert row is not None
        assert row.open_until is not None
        assert circuit.open_count(session) == 1
    attempts_before = {item: delivery(database, item).attempts for item in by_endpoint[down.id]}
    assert _claim(database, 100) == []  # open: nothing taken, though deliveries are due
    assert {item: delivery(database, item).attempts for item in attempts_before} == (
        attempts_before
    )
    # Half-open after 30 s: one at a time; its failure reopens the circuit for twice as long.
    clock.travel(timedelta(seconds=31))
    probe = _claim(database, 100)
    assert len(probe) == 1
    assert _claim(database, 100) == []
    _fail(database, probe, status=503)
    with database.session() as session:
        row = session.get(EndpointCircuit, down.id)
        assert row is not None
        assert row.trips == 2
        assert (row.open_until - clock.now()).total_seconds() == pytest.approx(60, abs=1)
    # Once the receiver answers again, a success closes it and the backlog flows.
    clock.travel(timedelta(seconds=61))
    (trial,) = _claim(database, 100)
    with database.session() as session:
        attempts.record_many(session, [(trial, _Result(200))])
        assert session.get(EndpointCircuit, down.id) is None
    assert len(_claim(database, 100)) == plane.endpoint_max_in_flight


def test_an_open_circuit_holds_no_test_delivery_and_a_success_closes_it(database, plane):
    tenant = make_tenant(database)
    with scripted_receiver() as receiver:
        hook = add_endpoint(database, tenant.org_id, receiver.url)
        with database.session() as session:
            circuit.note(session, [(hook.id, False, True)] * plane.circuit_failure_threshold)
            assert circuit.open_count(session) == 1
            test = deliveries.create_test_delivery(session, tenant.org_id, hook.id)
            test_id = test.id
        made = attempt(database, test_id)
    assert made is not None
    assert made.outcome == Outcome.SUCCESS
    with database.session() as session:
        assert circuit.open_count(session) == 0


def test_client_errors_do_not_count_against_the_circuit(database, plane):
    tenant = make_tenant(database)
    _, by_endpoint = _backlog(database, tenant.org_id, ["http://127.0.0.1:9/strict"], 5)
    for _ in range(plane.circuit_failure_threshold + 1):
        plans = _claim(database, 1)
        assert len(plans) == 1
        _fail(database, plans, status=400)
        clock.travel(timedelta(seconds=61))
    with database.session() as session:
        assert circuit.open_count(session) == 0


# --- the dispatcher -----------------------------------------------------------------------------


class _Slow(BaseHTTPRequestHandler):
    """Answers 200 after ``delay`` seconds; counts the requests it holds at once."""

    delay = 0.5
    lock = threading.Lock()
    holding = 0
    most = 0

    def do_POST(self) -> None:  # noqa: N802 - http.server's dispatch name
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        cls = type(self)
        with cls.lock:
            cls.holding += 1
            cls.most = max(cls.most, cls.holding)
        time.sleep(cls.delay)
        with cls.lock:
            cls.holding -= 1
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        return


@pytest.fixture
def dispatcher(database, plane) -> Iterator[Dispatcher]:
    with overridden(plane, delivery_concurrency=4, endpoint_max_in_flight=4, org_max_in_flight=4):
        running = Dispatcher(database).start()
        try:
            yield running
        finally:
            running.stop(timeout=10)


def _wait(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise TimeoutError("condition not met")


def test_the_dispatcher_sends_a_quiet_organization_first_and_never_exceeds_its_slots(
    database, dispatcher
):
    busy, quiet = make_tenant(database, name="Busy"), make_tenant(database, name="Quiet")
    with serving(_Slow) as slow_port, scripted_receiver() as fast:
        _Slow.most = 0
        _, by_endpoint = _backlog(database, busy.org_id, [f"http://127.0.0.1:{slow_port}/a"], 12)
        backlog = by_endpoint.popitem()[1]
        dispatcher.wake()
        _wait(lambda: _Slow.holding == 4)  # every slot taken by the backlog
        add_endpoint(database, quiet.org_id, fast.url)
        _, [late] = publish(database, quiet.org_id)
        dispatcher.wake()
        _wait(lambda: delivery(database, late).state == DeliveryState.SUCCEEDED)
        # The quiet delivery went out as soon as one slot freed: most of the backlog waits.
        done = [delivery(database, item).state for item in backlog]
        assert done.count(DeliveryState.SUCCEEDED) < len(backlog)
        _wait(
            lambda: all(
                delivery(database, item).state == DeliveryState.SUCCEEDED for item in backlog
            )
        )
    assert _Slow.most == 4  # never more requests in flight than slots
    assert dispatcher.in_flight == 0
    for item in backlog:
        assert [row.attempt for row in attempts_of(database, item)] == [1]
