"""One attempt at a time: claim → send → record, straight through ``workers.deliveries.attempt``.

No Celery worker runs here: the messages ``attempt`` publishes for retries are never consumed,
so each test decides exactly when the next attempt happens.
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from models import attempts, clock, org_secret
from models import delivery as deliveries
from models.delivery import DeliveryAttempt, DeliveryKind, DeliveryState, Outcome
from models.endpoint import WebhookEndpoint
from receiver import BadSignature, verify
from tests.deliveries.helpers import (
    EVENT_ID,
    RFC3339_Z,
    add_endpoint,
    all_rows,
    attempts_of,
    big_body_receiver,
    delivery,
    event,
    exactly,
    publish,
    seconds_between,
)
from tests.factories import make_tenant
from tests.receivers import scripted_receiver
from tests.support import overridden
from workers.deliveries import attempt

ENVELOPE_KEYS = {"id", "type", "api_version", "created_at", "org_id", "data"}


@pytest.fixture
def insecure(settings):
    """Loopback http:// receivers are allowed for the whole test."""
    with overridden(settings, allow_insecure_urls=True) as changed:
        yield changed


# --- idempotency (docs/architecture.md, invariant 3) ------------------------------------------


def test_attempt_twice_sends_once(database, insecure):
    tenant = make_tenant(database)
    with scripted_receiver() as receiver:
        add_endpoint(database, tenant.org_id, receiver.url)
        event_id, (delivery_id,) = publish(database, tenant.org_id)
        first = attempt(database, delivery_id)
        second = attempt(database, delivery_id)
        received = exactly(receiver, 1)
    assert first is not None
    assert first.outcome == Outcome.SUCCESS
    assert first.response_status == 200
    assert first.attempt == 1
    assert first.event_id == event_id
    assert second is None
    assert len(received) == 1
    assert [row.id for row in attempts_of(database, delivery_id)] == [first.id]
    row = delivery(database, delivery_id)
    assert row.state == DeliveryState.SUCCEEDED
    assert row.attempts == 1
    assert row.next_attempt_at is None
    # Any later duplicate message is still a no-op.
    assert attempt(database, delivery_id) is None
    assert len(attempts_of(database, delivery_id)) == 1


def test_concurrent_duplicates_send_once(database, insecure):
    tenant = make_tenant(database)
    with scripted_receiver() as receiver:
        add_endpoint(database, tenant.org_id, receiver.url)
        _, (delivery_id,) = publish(database, tenant.org_id)
        barrier = threading.Barrier(4)
        results: list[DeliveryAttempt | None] = []
        lock = threading.Lock()

        def run() -> None:
            barrier.wait()
            outcome = attempt(database, delivery_id)
            with lock:
                results.append(outcome)

        threads = [threading.Thread(target=run) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        received = exactly(receiver, 1)
    assert len(results) == 4
    assert sum(result is not None for result in results) == 1
    assert len(received) == 1
    assert len(attempts_of(database, delivery_id)) == 1
    assert delivery(database, delivery_id).state == DeliveryState.SUCCEEDED


def test_early_duplicate_of_a_scheduled_retry_does_nothing(database, insecure):
    tenant = make_tenant(database)
    with scripted_receiver(default_status=500) as receiver:
        add_endpoint(database, tenant.org_id, receiver.url)
        _, (delivery_id,) = publish(database, tenant.org_id)
        first = attempt(database, delivery_id)
        assert first is not None
        assert first.outcome == Outcome.RETRY
        assert attempt(database, delivery_id) is None  # the retry is not due yet
        exactly(receiver, 1)
    assert len(attempts_of(database, delivery_id)) == 1
    assert delivery(database, delivery_id).attempts == 1


def test_a_claim_that_never_reports_back_is_due_again_after_its_lease(database, insecure):
    """A worker killed mid-send: the claim holds the delivery, then the reconciler re-sends."""
    tenant = make_tenant(database)
    with scripted_receiver() as receiver:
        add_endpoint(database, tenant.org_id, receiver.url)
        _, (delivery_id,) = publish(database, tenant.org_id)
        with database.session() as session:
            plan = attempts.claim(session, delivery_id)
        assert plan is not None
        assert plan.attempt == 1
        with database.session() as session:
            assert attempts.claim(session, delivery_id) is None  # leased
            assert delivery_id not in deliveries.overdue(session, older_than=timedelta(0))
        # The lease covers a whole request (its total deadline) and its record.
        lease = timedelta(seconds=2 * insecure.delivery_timeout_seconds + 5)
        clock.travel(lease - timedelta(seconds=3))
        with database.session() as session:
            assert attempts.claim(session, delivery_id) is None  # still leased
        clock.travel(timedelta(seconds=4))
        with database.session() as session:
            assert deliveries.overdue(session, older_than=timedelta(0)) == [delivery_id]
        resent = attempt(database, delivery_id)
        exactly(receiver, 1)  # the first claim never sent anything
    assert resent is not None
    assert resent.attempt == 2
    assert resent.outcome == Outcome.SUCCESS
    assert delivery(database, delivery_id).state == DeliveryState.SUCCEEDED
    # Every attempt is in the log exactly once, the lost one said to be lost.
    logged = attempts_of(database, delivery_id)
    assert [(row.attempt, row.outcome, row.error) for row in logged] == [
        (1, Outcome.RETRY, attempts.LOST_ATTEMPT),
        (2, Outcome.SUCCESS, None),
    ]
    assert logged[0].response_status is None


def test_delivery_to_an_endpoint_deleted_meanwhile_is_abandoned_unsent(database, insecure):
    tenant = make_tenant(database)
    with scripted_receiver() as receiver:
        hook = add_endpoint(database, tenant.org_id, receiver.url)
        _, (delivery_id,) = publish(database, tenant.org_id)
        # The endpoint disappears without its deliveries being touched (a delete racing the
        # publish): the claim itself must notice.
        with database.session() as session:
            session.execute(
                update(WebhookEndpoint)
                .where(WebhookEndpoint.id == hook.id)
                .values(deleted_at=clock.now(), active=False)
            )
        assert attempt(database, delivery_id) is None
        exactly(receiver, 0)
    row = delivery(database, delivery_id)
    assert row.state == DeliveryState.ABANDONED
    assert row.attempts == 0
    assert attempts_of(database, delivery_id) == []


def test_delivery_to_a_paused_endpoint_is_abandoned_unsent(database, insecure):
    tenant = make_tenant(database)
    with scripted_receiver() as receiver:
        hook = add_endpoint(database, tenant.org_id, receiver.url)
        _, (delivery_id,) = publish(database, tenant.org_id)
        with database.session() as session:
            session.execute(
                update(WebhookEndpoint).where(WebhookEndpoint.id == hook.id).values(active=False)
            )
        assert attempt(database, delivery_id) is None
        exactly(receiver, 0)
    assert delivery(database, delivery_id).state == DeliveryState.ABANDONED


def test_deleting_an_endpoint_through_the_api_abandons_its_pending_deliveries(
    client, database, insecure
):
    tenant = make_tenant(database)
    with scripted_receiver() as receiver:
        doomed = add_endpoint(database, tenant.org_id, receiver.url)
        kept = add_endpoint(database, tenant.org_id, receiver.url + "/kept")
        _, done = publish(database, tenant.org_id)
        by_endpoint = {delivery(database, d).endpoint_id: d for d in done}
        sent = attempt(database, by_endpoint[doomed.id])
        assert sent is not None
        assert sent.outcome == Outcome.SUCCESS
        _, pending = publish(database, tenant.org_id)
        pending_by_endpoint = {delivery(database, d).endpoint_id: d for d in pending}

        response = client.delete(f"/v1/webhooks/{doomed.id}", headers=tenant.headers)
        assert response.status_code == 204, response.text

        abandoned = delivery(database, pending_by_endpoint[doomed.id])
        assert abandoned.state == DeliveryState.ABANDONED
        assert abandoned.next_attempt_at is None
        assert attempt(database, abandoned.id) is None
        exactly(receiver, 1)  # only the attempt made before the delete
    # History is kept; the other endpoint's deliveries are untouched.
    assert delivery(database, by_endpoint[doomed.id]).state == DeliveryState.SUCCEEDED
    assert len(attempts_of(database, by_endpoint[doomed.id])) == 1
    assert delivery(database, pending_by_endpoint[kept.id]).state == DeliveryState.PENDING
    assert delivery(database, by_endpoint[kept.id]).state == DeliveryState.PENDING


# --- retries ----------------------------------------------------------------------------------


def test_failed_attempt_is_retried_after_the_first_step(database, settings):
    tenant = make_tenant(database)
    with (
        overridden(settings, allow_insecure_urls=True, delivery_retry_jitter=0.1),
        scripted_receiver(default_status=500) as receiver,
    ):
        add_endpoint(database, tenant.org_id, receiver.url)
        _, (delivery_id,) = publish(database, tenant.org_id)
        logged = attempt(database, delivery_id)
        step = settings.delivery_retry_schedule[0]
    assert logged is not None
    assert logged.outcome == Outcome.RETRY
    assert logged.response_status == 500
    assert logged.error is None
    row = delivery(database, delivery_id)
    assert row.state == DeliveryState.PENDING
    assert row.attempts == 1
    waited = seconds_between(row.next_attempt_at, logged.occurred_at)
    assert step * 0.9 - 0.001 <= waited <= step * 1.1 + 0.001, (waited, step)
    assert abs(seconds_between(row.next_attempt_at, clock.now()) - step) < step * 0.1 + 2


def test_attempts_past_the_schedule_are_dead(database, settings):
    tenant = make_tenant(database)
    schedule = [5.0, 10.0]
    with (
        overridden(
            settings,
            allow_insecure_urls=True,
            delivery_retry_schedule=schedule,
            delivery_retry_jitter=0.0,
        ),
        scripted_receiver(default_status=500) as receiver,
    ):
        add_endpoint(database, tenant.org_id, receiver.url)
        _, (delivery_id,) = publish(database, tenant.org_id)
        outcomes = []
        for step in [*schedule, None]:
            logged = attempt(database, delivery_id)
            assert logged is not None
            outcomes.append(logged.outcome)
            row = delivery(database, delivery_id)
            if step is None:
                assert row.next_attempt_at is None
            else:
                assert seconds_between(row.next_attempt_at, logged.occurred_at) == step
                assert attempt(database, delivery_id) is None  # not due yet
                clock.travel(timedelta(seconds=step))
        clock.travel(timedelta(hours=1))
        assert attempt(database, delivery_id) is None
        exactly(receiver, 3)
    assert outcomes == [Outcome.RETRY, Outcome.RETRY, Outcome.DEAD]
    row = delivery(database, delivery_id)
    assert row.state == DeliveryState.DEAD
    assert row.attempts == 3
    logged_rows = attempts_of(database, delivery_id)
    assert [a.attempt for a in logged_rows] == [1, 2, 3]
    assert [a.outcome for a in logged_rows] == ["retry", "retry", "dead"]


def test_unreachable_receiver_is_retried_with_an_error(database, insecure):
    tenant = make_tenant(database)
    with scripted_receiver() as receiver:
        url = receiver.url
    add_endpoint(database, tenant.org_id, url)  # nothing listens on that port any more
    _, (delivery_id,) = publish(database, tenant.org_id)
    logged = attempt(database, delivery_id)
    assert logged is not None
    assert logged.outcome == Outcome.RETRY
    assert logged.response_status is None
    assert logged.error == "connection refused"


@pytest.mark.parametrize(
    ("status", "retry_after", "expected"),
    [
        (429, "7", 7.0),  # honoured
        (503, "7", 7.0),
        (429, "3600", 30.0),  # capped at the schedule's longest step
        (429, "0", 1.0),  # never sooner than the step
        (500, "7", 1.0),  # only 429 and 503 carry a Retry-After we honour
    ],
)
def test_retry_after_sets_the_next_attempt(database, settings, status, retry_after, expected):
    tenant = make_tenant(database)
    with (
        overridden(
            settings,
            allow_insecure_urls=True,
            delivery_retry_schedule=[1.0, 30.0],
            delivery_retry_jitter=0.0,
        ),
        scripted_receiver() as receiver,
    ):
        receiver.answer(status, headers={"Retry-After": retry_after})
        add_endpoint(database, tenant.org_id, receiver.url)
        _, (delivery_id,) = publish(database, tenant.org_id)
        before = clock.now()
        logged = attempt(database, delivery_id)
        after = clock.now()
        assert logged is not None
        assert logged.outcome == Outcome.RETRY
        assert logged.response_status == status
        row = delivery(database, delivery_id)
        assert seconds_between(row.next_attempt_at, logged.occurred_at) == pytest.approx(expected)
        due = row.next_attempt_at
        assert due is not None
        assert before + timedelta(seconds=expected) <= due <= after + timedelta(seconds=expected)
        if expected > 1.0:  # the claim tolerates one second of clock skew
            assert attempt(database, delivery_id) is None
        clock.travel(timedelta(seconds=expected))
        retried = attempt(database, delivery_id)
        assert retried is not None
        assert retried.outcome == Outcome.SUCCESS
        exactly(receiver, 2)


# --- overdue (the reconciler's query) --------------------------------------------------------


def test_overdue_returns_only_pending_event_deliveries_past_the_threshold(database, settings):
    tenant = make_tenant(database)
    other = make_tenant(database, name="Other")
    with (
        overridden(
            settings,
            allow_insecure_urls=True,
            delivery_retry_schedule=[5.0],
            delivery_retry_jitter=0.0,
        ),
        scripted_receiver() as ok,
        scripted_receiver(default_status=500) as failing,
    ):
        good = add_endpoint(database, tenant.org_id, ok.url)
        add_endpoint(database, tenant.org_id, failing.url, events=["wallet.balance_low"])
        add_endpoint(database, tenant.org_id, failing.url, events=["consent_pending.confirmed"])
        doomed = add_endpoint(database, tenant.org_id, ok.url, events=["lookup.completed"])
        add_endpoint(database, other.org_id, ok.url)

        _, (dead,) = publish(database, tenant.org_id, "consent_pending.confirmed")
        assert attempt(database, dead) is not None
        clock.travel(timedelta(seconds=5))
        assert attempt(database, dead) is not None
        assert delivery(database, dead).state == DeliveryState.DEAD

        _, (succeeded,) = publish(database, tenant.org_id)
        assert attempt(database, succeeded) is not None
        _, (retrying,) = publish(database, tenant.org_id, "wallet.balance_low")
        assert attempt(database, retrying) is not None  # due again in 5 s
        with database.session() as session:
            test_delivery = deliveries.create_test_delivery(session, tenant.org_id, good.id).id
        _, (abandoned,) = publish(database, tenant.org_id, "lookup.completed")
        with database.session() as session:
            deliveries.abandon_pending(session, doomed.id)

        clock.travel(timedelta(seconds=30))
        _, (lost,) = publish(database, tenant.org_id)  # its message never arrived
        _, (foreign,) = publish(database, other.org_id)

    def overdue(older_than: timedelta, limit: int = 500) -> list[uuid.UUID]:
        with database.session() as session:
            return deliveries.overdue(session, older_than=older_than, limit=limit)

    minute = timedelta(minutes=1)
    # The retry was due 25 s ago; the newest two were created just now.
    assert overdue(minute) == []
    assert overdue(timedelta(seconds=10)) == [retrying]
    clock.travel(timedelta(seconds=45))
    assert overdue(minute) == [retrying]  # 70 s overdue; the newest two only 45 s old
    clock.travel(timedelta(seconds=20))
    assert overdue(minute) == [retrying, lost, foreign]  # oldest first
    assert overdue(minute, limit=1) == [retrying]
    # Never the finished, abandoned or test deliveries, however old.
    clock.travel(timedelta(days=1))
    assert overdue(minute) == [retrying, lost, foreign]
    states = {d: delivery(database, d) for d in (dead, succeeded, test_delivery, abandoned)}
    assert states[dead].state == DeliveryState.DEAD
    assert states[succeeded].state == DeliveryState.SUCCEEDED
    assert states[abandoned].state == DeliveryState.ABANDONED
    assert states[test_delivery].state == DeliveryState.PENDING
    assert states[test_delivery].kind == DeliveryKind.TEST


# --- what is sent and what is logged ----------------------------------------------------------


def test_body_is_the_contract_envelope_signed_both_ways(client, database, insecure):
    tenant = make_tenant(database)
    data = {"brand": "b_1", "note": "ünïcode ✓", "nested": {"list": [1, 2.5, None, True]}}
    with scripted_receiver() as receiver:
        hook = add_endpoint(database, tenant.org_id, receiver.url)
        other = add_endpoint(database, tenant.org_id, receiver.url, events=["lookup.completed"])
        published = client.post(
            "/v1/events", json={"type": "brand.vetted", "data": data}, headers=tenant.headers
        )
        assert published.status_code == 202, published.text
        (queued,) = published.json()["deliveries"]
        logged = attempt(database, uuid.UUID(queued["id"]))
        (got,) = exactly(receiver, 1)
    assert logged is not None
    body = json.loads(got.body)
    assert set(body) == ENVELOPE_KEYS
    assert list(body) == ["id", "type", "api_version", "created_at", "org_id", "data"]
    assert body["id"] == published.json()["id"]
    assert EVENT_ID.match(body["id"])
    assert body["type"] == "brand.vetted"
    assert body["api_version"] == "2026-04-01"
    assert RFC3339_Z.match(body["created_at"])
    assert body["created_at"].endswith("Z")
    assert body["created_at"] == published.json()["created_at"]
    assert body["org_id"] == str(tenant.org_id)
    assert body["data"] == data
    assert got.headers["Content-Type"] == "application/json"

    now = clock.now().timestamp()
    amcore = verify(got.headers, got.body, [hook.secret], scheme="amcore")
    standard = verify(got.headers, got.body, [hook.secret], scheme="standard")
    assert amcore.scheme == "amcore"
    assert standard.scheme == "standard"
    assert standard.msg_id == body["id"] == got.headers["webhook-id"]
    assert amcore.timestamp == standard.timestamp == int(got.headers["webhook-timestamp"])
    assert abs(amcore.timestamp - now) < 5
    for scheme in ("amcore", "standard"):
        with pytest.raises(BadSignature):
            verify(got.headers, got.body, [other.secret], scheme=scheme)
        with pytest.raises(BadSignature):
            verify(got.headers, got.body + b" ", [hook.secret], scheme=scheme)
    assert "X-AmCore-Org-Signature" not in got.headers  # the org has no org secret

    # The log: what was sent, never a secret or a signature.
    assert logged.request_body_sha256 == hashlib.sha256(got.body).hexdigest()
    assert logged.request_body_bytes == len(got.body)
    assert logged.event_id == body["id"]
    assert logged.event_type == "brand.vetted"
    assert logged.url == receiver.url
    assert logged.endpoint_id == hook.id
    recorded = logged.request_headers
    assert recorded["X-AmCore-Signature"] == "[redacted]"
    assert recorded["webhook-signature"] == "[redacted]"
    assert recorded["webhook-id"] == body["id"]
    assert recorded["Content-Type"] == "application/json"
    flat = json.dumps(recorded)
    assert hook.secret not in flat
    assert got.headers["X-AmCore-Signature"].split("v1=")[1] not in flat
    assert got.headers["webhook-signature"].split(",", 1)[1] not in flat
    # The same through the API.
    shown = client.get(f"/v1/webhooks/deliveries/{logged.id}", headers=tenant.headers)
    assert shown.status_code == 200, shown.text
    assert shown.json()["request_headers"] == recorded
    assert shown.json()["request_body_sha256"] == hashlib.sha256(got.body).hexdigest()
    assert hook.secret not in shown.text


def test_org_signature_verifies_and_is_redacted_in_the_log(database, insecure):
    tenant = make_tenant(database)
    with database.session() as session:
        org_key = org_secret.rotate(session, tenant.org_id).secret
    with scripted_receiver() as receiver:
        hook = add_endpoint(database, tenant.org_id, receiver.url)
        _, (delivery_id,) = publish(database, tenant.org_id)
        logged = attempt(database, delivery_id)
        (got,) = exactly(receiver, 1)
    assert logged is not None
    verify(got.headers, got.body, [org_key], scheme="org")
    with pytest.raises(BadSignature):
        verify(got.headers, got.body, [hook.secret], scheme="org")
    assert logged.request_headers["X-AmCore-Org-Signature"] == "[redacted]"
    flat = json.dumps(logged.request_headers)
    assert org_key not in flat
    assert hook.secret not in flat
    for signature in got.headers["X-AmCore-Org-Signature"].split(",")[1:]:
        assert signature.split("=", 1)[1] not in flat


def test_a_big_response_is_kept_as_a_short_excerpt(database, insecure):
    tenant = make_tenant(database)
    page = ("<html>" + "é" * 3000 + "x" * 10_000 + "</html>").encode()
    with big_body_receiver(500, page) as receiver:
        add_endpoint(database, tenant.org_id, receiver.url)
        _, (delivery_id,) = publish(database, tenant.org_id, data={"pad": "y" * 5000})
        logged = attempt(database, delivery_id)
        (sent,) = receiver.bodies
    assert logged is not None
    assert logged.response_status == 500
    excerpt = logged.response_body_excerpt
    assert 0 < len(excerpt) <= 2048
    assert excerpt.startswith("<html>" + "é" * 100)
    assert "x" not in excerpt  # only the start of the body was read
    assert logged.request_body_bytes == len(sent) > 5000
    assert logged.request_body_sha256 == hashlib.sha256(sent).hexdigest()
    (stored,) = [a for a in all_rows(database, DeliveryAttempt) if a.id == logged.id]
    assert stored.response_body_excerpt == excerpt


def test_a_response_with_nul_characters_is_recorded(database, insecure):
    """PostgreSQL's text refuses NUL: a receiver answering with one must not stop its attempt,
    or the others recorded with it, from being logged."""
    tenant = make_tenant(database)
    with big_body_receiver(500, b"bad\x00body\xff") as receiver:
        add_endpoint(database, tenant.org_id, receiver.url)
        _, (delivery_id,) = publish(database, tenant.org_id)
        logged = attempt(database, delivery_id)
    assert logged is not None
    assert logged.response_body_excerpt == "bad\ufffdbody\ufffd"
    (stored,) = [a for a in all_rows(database, DeliveryAttempt) if a.id == logged.id]
    assert stored.response_body_excerpt == "bad\ufffdbody\ufffd"


def test_each_attempt_is_signed_at_its_own_time_over_the_same_body(database, settings):
    tenant = make_tenant(database)
    with (
        overridden(settings, allow_insecure_urls=True, delivery_retry_jitter=0.0),
        scripted_receiver() as receiver,
    ):
        receiver.answer(500)
        hook = add_endpoint(database, tenant.org_id, receiver.url)
        event_id, (delivery_id,) = publish(database, tenant.org_id)
        assert attempt(database, delivery_id) is not None
        clock.travel(timedelta(seconds=120))
        assert attempt(database, delivery_id) is not None
        first, second = exactly(receiver, 2)
    assert first.body == second.body
    assert json.loads(first.body)["created_at"] == clock.rfc3339(
        event(database, event_id).created_at
    )
    stamps = [int(got.headers["webhook-timestamp"]) for got in (first, second)]
    assert stamps[1] - stamps[0] >= 120
    for got in (first, second):
        verify(got.headers, got.body, [hook.secret], now=float(got.headers["webhook-timestamp"]))
    assert datetime.fromtimestamp(stamps[1], UTC) <= clock.now()
