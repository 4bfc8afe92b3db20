"""POST /v1/webhooks/deliveries/{id}/replay: same data, fresh event id, 10/min (docs/api.md)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

from models import clock
from models.delivery import Delivery, DeliveryKind, DeliveryState, Event
from receiver import verify
from tests.api.helpers import assert_error, parse_time
from tests.deliveries.helpers import (
    EVENT_ID,
    MISSING_ID,
    Hook,
    add_endpoint,
    all_rows,
    exactly,
    publish,
)
from tests.factories import Tenant, add_key, make_tenant
from tests.receivers import scripted_receiver
from tests.support import overridden
from workers.deliveries import attempt

DATA = {"brand": "b_1", "amount": {"cents": 1250, "currency": "EUR"}, "tags": ["a", "ü"]}


@dataclass(frozen=True)
class Sent:
    tenant: Tenant
    hook: Hook
    event_id: str
    attempt_id: str


def _sent(database: Any, receiver_url: str, name: str = "Acme") -> Sent:
    """An organization with one endpoint and one logged attempt of a brand.vetted event."""
    tenant = make_tenant(database, name=name)
    hook = add_endpoint(database, tenant.org_id, receiver_url)
    event_id, (delivery_id,) = publish(database, tenant.org_id, "brand.vetted", DATA)
    logged = attempt(database, delivery_id)
    assert logged is not None
    return Sent(tenant=tenant, hook=hook, event_id=event_id, attempt_id=str(logged.id))


@pytest.fixture
def receiver(settings):
    with overridden(settings, allow_insecure_urls=True), scripted_receiver() as scripted:
        yield scripted


def _replay(client: Any, tenant: Tenant, attempt_id: str) -> Any:
    return client.post(f"/v1/webhooks/deliveries/{attempt_id}/replay", headers=tenant.headers)


def test_replay_resends_the_data_under_a_new_event_id(client, database, receiver):
    sent = _sent(database, receiver.url)
    response = _replay(client, sent.tenant, sent.attempt_id)
    assert response.status_code == 202, response.text
    body = response.json()
    assert set(body) == {"delivery_id", "endpoint_id", "event_type", "new_event_id", "enqueued_at"}
    assert body["delivery_id"] == sent.attempt_id
    assert body["endpoint_id"] == str(sent.hook.id)
    assert body["event_type"] == "brand.vetted"
    assert EVENT_ID.match(body["new_event_id"])
    assert body["new_event_id"] != sent.event_id
    assert abs((parse_time(body["enqueued_at"]) - clock.now()).total_seconds()) < 5

    (new_event,) = [row for row in all_rows(database, Event) if row.id == body["new_event_id"]]
    assert new_event.type == "brand.vetted"
    assert new_event.data == DATA
    assert new_event.org_id == sent.tenant.org_id
    assert new_event.replay_of == uuid.UUID(sent.attempt_id)
    (new_delivery,) = [row for row in all_rows(database, Delivery) if row.event_id == new_event.id]
    assert new_delivery.endpoint_id == sent.hook.id
    assert new_delivery.state == DeliveryState.PENDING
    assert new_delivery.kind == DeliveryKind.EVENT
    assert new_delivery.attempts == 0

    # The worker sends it like any delivery: new id, same data, signed with the endpoint secret.
    logged = attempt(database, new_delivery.id)
    assert logged is not None
    assert logged.outcome == "success"
    original, replayed = exactly(receiver, 2)
    envelope = json.loads(replayed.body)
    assert envelope["id"] == body["new_event_id"]
    assert envelope["data"] == json.loads(original.body)["data"] == DATA
    assert envelope["type"] == "brand.vetted"
    verify(replayed.headers, replayed.body, [sent.hook.secret], scheme="standard")
    assert replayed.headers["webhook-id"] == body["new_event_id"]
    listed = client.get(
        "/v1/webhooks/deliveries", params={"limit": 200}, headers=sent.tenant.headers
    ).json()["data"]
    assert {row["event_id"] for row in listed} == {sent.event_id, body["new_event_id"]}


def test_a_failed_attempt_can_be_replayed(client, database, receiver):
    receiver.answer(500)
    sent = _sent(database, receiver.url)
    response = _replay(client, sent.tenant, sent.attempt_id)
    assert response.status_code == 202, response.text
    assert response.json()["delivery_id"] == sent.attempt_id


def test_the_eleventh_replay_in_a_minute_is_rate_limited(client, database, receiver, settings):
    assert settings.replay_limit_per_minute == 10
    sent = _sent(database, receiver.url)
    other = _sent(database, receiver.url, name="Other")
    new_ids = set()
    for _ in range(10):
        response = _replay(client, sent.tenant, sent.attempt_id)
        assert response.status_code == 202, response.text
        new_ids.add(response.json()["new_event_id"])
    assert len(new_ids) == 10
    events, deliveries = len(all_rows(database, Event)), len(all_rows(database, Delivery))

    limited = _replay(client, sent.tenant, sent.attempt_id)
    assert_error(limited, 429, "RATE_LIMITED")
    retry_after = limited.headers["Retry-After"]
    assert retry_after.isdigit(), retry_after
    assert 1 <= int(retry_after) <= 61
    assert len(all_rows(database, Event)) == events
    assert len(all_rows(database, Delivery)) == deliveries

    # The limit is per organization.
    assert _replay(client, other.tenant, other.attempt_id).status_code == 202

    clock.travel(timedelta(seconds=30))
    still = _replay(client, sent.tenant, sent.attempt_id)
    assert_error(still, 429, "RATE_LIMITED")
    assert 1 <= int(still.headers["Retry-After"]) <= 31

    clock.travel(timedelta(seconds=31))
    again = _replay(client, sent.tenant, sent.attempt_id)
    assert again.status_code == 202, again.text
    assert again.json()["new_event_id"] not in new_ids


def test_replay_to_a_deleted_endpoint_is_404(client, database, receiver):
    sent = _sent(database, receiver.url)
    deleted = client.delete(f"/v1/webhooks/{sent.hook.id}", headers=sent.tenant.headers)
    assert deleted.status_code == 204
    events = len(all_rows(database, Event))
    assert_error(_replay(client, sent.tenant, sent.attempt_id), 404, "NOT_FOUND", "not found")
    assert len(all_rows(database, Event)) == events
    # The history itself is kept and readable.
    shown = client.get(f"/v1/webhooks/deliveries/{sent.attempt_id}", headers=sent.tenant.headers)
    assert shown.status_code == 200


def test_failed_replays_do_not_use_up_the_limit(client, database, receiver):
    sent = _sent(database, receiver.url)
    for _ in range(12):
        assert _replay(client, sent.tenant, MISSING_ID).status_code == 404
    assert _replay(client, sent.tenant, sent.attempt_id).status_code == 202


def test_another_organizations_attempt_is_404(client, database, receiver):
    mine = _sent(database, receiver.url)
    theirs = _sent(database, receiver.url, name="Other")
    events = len(all_rows(database, Event))
    assert_error(_replay(client, mine.tenant, theirs.attempt_id), 404, "NOT_FOUND", "not found")
    assert_error(_replay(client, mine.tenant, MISSING_ID), 404, "NOT_FOUND")
    assert len(all_rows(database, Event)) == events


def test_replay_needs_webhooks_write(client, database, receiver):
    sent = _sent(database, receiver.url)
    url = f"/v1/webhooks/deliveries/{sent.attempt_id}/replay"
    assert_error(client.post(url), 401, "UNAUTHORIZED", "authentication failed")
    reader = add_key(database, sent.tenant, ["webhooks:read", "events:write"])
    assert_error(
        client.post(url, headers=reader.headers), 403, "FORBIDDEN", "missing required scope"
    )
    assert len(all_rows(database, Event)) == 1
