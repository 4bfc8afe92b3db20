"""Several deliveries at once: ``workers.deliveries.send`` claims the due ones set-based and
records them together; each delivery keeps its own state, retry schedule and attempt log. A
``delivery.send`` message only wakes the data plane: it carries no ids.

No Celery worker runs here: the messages published are captured, never consumed, so each test
decides exactly when a batch is sent.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy import update

from models import attempts, clock
from models import delivery as deliveries
from models.delivery import DeliveryState, Outcome
from models.endpoint import WebhookEndpoint
from receiver import verify
from schedules.ticks import reconcile_deliveries
from tests.deliveries.helpers import (
    add_endpoint,
    attempts_of,
    delivery,
    exactly,
    publish,
    seconds_between,
)
from tests.factories import make_tenant
from tests.receivers import scripted_receiver
from tests.support import overridden, published_tasks
from workers.deliveries import enqueue, send
from workers.names import TaskName


@pytest.fixture
def insecure(settings):
    """Loopback http:// receivers are allowed for the whole test."""
    with overridden(settings, allow_insecure_urls=True) as changed:
        yield changed


@pytest.fixture
def published() -> Iterator[list[tuple[str, list[str], Any]]]:
    """Every message published meanwhile: (task name, args, eta)."""
    with published_tasks() as seen:
        yield seen


def _sends(published: list[tuple[str, list[str], Any]]) -> list[list[str]]:
    return [args for name, args, _ in published if name == TaskName.DELIVERY_SEND.value]


def _fan_out(
    database, org_id, url: str, count: int
) -> tuple[dict[uuid.UUID, Any], list[uuid.UUID]]:
    """``count`` endpoints at ``url``/<i>, one event to all of them: (hooks by delivery, ids)."""
    hooks = [add_endpoint(database, org_id, f"{url}/{index}") for index in range(count)]
    _, ids = publish(database, org_id)
    by_endpoint = {hook.id: hook for hook in hooks}
    return {item: by_endpoint[delivery(database, item).endpoint_id] for item in ids}, ids


# --- one wake-up per commit ---------------------------------------------------------------------


def test_an_event_is_one_wake_up_message_carrying_nothing(client, database, insecure, published):
    tenant = make_tenant(database)
    for index in range(3):
        add_endpoint(database, tenant.org_id, f"http://127.0.0.1:9/{index}")
    response = client.post(
        "/v1/events", json={"type": "brand.vetted", "data": {}}, headers=tenant.headers
    )
    assert response.status_code == 202, response.text
    assert len(response.json()["deliveries"]) == 3
    assert _sends(published) == [[]]  # the database says what is due (invariant 1)


def test_the_wake_up_is_published_only_after_the_commit(database, insecure, published):
    tenant = make_tenant(database)
    add_endpoint(database, tenant.org_id, "http://127.0.0.1:9/hooks")
    with database.session() as session:
        _, created = deliveries.publish(session, tenant.org_id, "brand.vetted", {})
        enqueue(session, [item.id for item in created])
        assert _sends(published) == []  # invariant 2
    assert _sends(published) == [[]]
    with database.session() as session:
        _, created = deliveries.publish(session, tenant.org_id, "campaign.approved", {})
        assert created == []  # nobody subscribed
        enqueue(session, [])
    assert _sends(published) == [[]]  # nothing due, nobody woken


# --- a batch ------------------------------------------------------------------------------------


def test_a_batch_sends_each_delivery_once_signed_with_its_own_secret(database, insecure):
    tenant = make_tenant(database)
    with scripted_receiver() as receiver:
        hooks, ids = _fan_out(database, tenant.org_id, receiver.url, 3)
        made = send(database, ids)
        received = exactly(receiver, 3)
        # The same message again (a duplicate or redelivery) does nothing (invariant 1).
        assert send(database, ids) == []
        exactly(receiver, 3)
    assert sorted(row.delivery_id for row in made) == sorted(ids)
    assert {row.outcome for row in made} == {Outcome.SUCCESS}
    secrets_by_path = {urlsplit(hook.url).path: hook.secret for hook in hooks.values()}
    for request in received:
        verify(request.headers, request.body, [secrets_by_path[request.path]])
    for item in ids:
        row = delivery(database, item)
        assert row.state == DeliveryState.SUCCEEDED
        assert row.attempts == 1
        assert [a.attempt for a in attempts_of(database, item)] == [1]


def test_concurrent_copies_of_a_batch_send_each_delivery_once(database, insecure):
    tenant = make_tenant(database)
    with scripted_receiver() as receiver:
        _, ids = _fan_out(database, tenant.org_id, receiver.url, 3)
        barrier = threading.Barrier(4)
        made: list[Any] = []
        lock = threading.Lock()

        def run() -> None:
            barrier.wait()
            sent = send(database, list(reversed(ids)))
            with lock:
                made.extend(sent)

        threads = [threading.Thread(target=run) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        received = exactly(receiver, 3)
    assert sorted(row.delivery_id for row in made) == sorted(ids)
    assert len({request.path for request in received}) == 3
    for item in ids:
        assert len(attempts_of(database, item)) == 1


def test_a_batch_skips_a_member_already_succeeded(database, insecure):
    tenant = make_tenant(database)
    with scripted_receiver() as receiver:
        _, ids = _fan_out(database, tenant.org_id, receiver.url, 3)
        first = send(database, ids[:1])
        assert len(first) == 1
        made = send(database, ids)
        exactly(receiver, 3)
    assert sorted(row.delivery_id for row in made) == sorted(ids[1:])
    assert len(attempts_of(database, ids[0])) == 1
    assert delivery(database, ids[0]).attempts == 1


def test_a_batch_skips_a_member_claimed_by_another_worker(database, insecure):
    tenant = make_tenant(database)
    with scripted_receiver() as receiver:
        _, ids = _fan_out(database, tenant.org_id, receiver.url, 3)
        with database.session() as session:
            assert attempts.claim(session, ids[1]) is not None  # leased, still in flight
        made = send(database, ids)
        exactly(receiver, 2)
    assert sorted(row.delivery_id for row in made) == sorted([ids[0], ids[2]])
    leased = delivery(database, ids[1])
    assert leased.state == DeliveryState.PENDING
    assert leased.attempts == 1
    assert attempts_of(database, ids[1]) == []


def test_a_batch_abandons_members_whose_endpoint_is_gone_or_paused(database, insecure):
    tenant = make_tenant(database)
    with scripted_receiver() as receiver:
        hooks, ids = _fan_out(database, tenant.org_id, receiver.url, 3)
        deleted, paused, live = (hooks[item].id for item in ids)
        with database.session() as session:
            session.execute(
                update(WebhookEndpoint)
                .where(WebhookEndpoint.id == deleted)
                .values(deleted_at=clock.now(), active=False)
            )
            session.execute(
                update(WebhookEndpoint).where(WebhookEndpoint.id == paused).values(active=False)
            )
        made = send(database, ids)
        (request,) = exactly(receiver, 1)
    assert [row.endpoint_id for row in made] == [live]
    assert request.path.endswith("/2")
    for item in ids[:2]:
        row = delivery(database, item)
        assert row.state == DeliveryState.ABANDONED
        assert row.attempts == 0
        assert row.next_attempt_at is None
        assert attempts_of(database, item) == []
    assert delivery(database, ids[2]).state == DeliveryState.SUCCEEDED


def test_one_member_is_retried_on_its_own_while_the_others_succeed(database, settings, published):
    tenant = make_tenant(database)
    schedule = [5.0, 60.0]
    with (
        overridden(
            settings,
            allow_insecure_urls=True,
            delivery_retry_schedule=schedule,
            delivery_retry_jitter=0.0,
        ),
        scripted_receiver() as good,
        scripted_receiver(default_status=503) as bad,
    ):
        add_endpoint(database, tenant.org_id, good.url + "/a")
        failing = add_endpoint(database, tenant.org_id, bad.url)
        add_endpoint(database, tenant.org_id, good.url + "/b")
        _, ids = publish(database, tenant.org_id)
        (retried,) = [item for item in ids if delivery(database, item).endpoint_id == failing.id]
        bad.answer(503, headers={"Retry-After": "7"})
        made = send(database, ids)
        exactly(good, 2)
        exactly(bad, 1)
        outcomes = {row.delivery_id: row.outcome for row in made}
        assert outcomes == {
            item: Outcome.RETRY if item == retried else Outcome.SUCCESS for item in ids
        }
        # The retry waits in the database, not in the broker: no message. Retry-After 7 s
        # beats the 5 s step.
        assert _sends(published) == []
        row = delivery(database, retried)
        assert row.state == DeliveryState.PENDING
        assert seconds_between(row.next_attempt_at, made[0].occurred_at) == 7.0
        for item in ids:
            if item != retried:
                assert delivery(database, item).state == DeliveryState.SUCCEEDED

        # The same batch again before the retry is due does nothing; once due, only it goes.
        assert send(database, ids) == []
        clock.travel(timedelta(seconds=7))
        bad.default_status = 200
        (again,) = send(database, ids)
        exactly(good, 2)
        exactly(bad, 2)
    assert again.delivery_id == retried
    assert again.attempt == 2
    assert again.outcome == Outcome.SUCCESS
    assert [a.outcome for a in attempts_of(database, retried)] == ["retry", "success"]
    assert delivery(database, retried).state == DeliveryState.SUCCEEDED


def test_a_batch_that_never_reports_back_is_resent_by_the_reconciler(database, insecure, published):
    """A worker killed between the claim and the record: the leases run out, the reconciler
    finds the deliveries overdue and wakes the data plane, which sends them again."""
    tenant = make_tenant(database)
    with scripted_receiver() as receiver:
        _, ids = _fan_out(database, tenant.org_id, receiver.url, 3)
        with database.session() as session:
            plans = attempts.claim_many(session, ids)
        assert sorted(plan.delivery_id for plan in plans) == sorted(ids)
        assert reconcile_deliveries() == 0  # leased: not overdue
        assert _sends(published) == []
        lease = 2 * insecure.delivery_timeout_seconds + 5
        clock.travel(timedelta(seconds=lease + insecure.reconcile_after_seconds + 2))
        assert reconcile_deliveries() == 3
        assert _sends(published) == [[]]
        made = send(database, ids)
        exactly(receiver, 3)  # the first claims never sent anything
    assert sorted(row.delivery_id for row in made) == sorted(ids)
    assert {row.attempt for row in made} == {2}
    assert {delivery(database, item).state for item in ids} == {DeliveryState.SUCCEEDED}
