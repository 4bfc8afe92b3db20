"""POST /v1/events and ``models.delivery.publish``: who gets a delivery (docs/api.md, "Events")."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from models import delivery as deliveries
from models.delivery import Delivery, DeliveryKind, DeliveryState, Event
from models.errors import ValidationFailed
from tests.api.helpers import assert_error, assert_validation, create
from tests.deliveries.helpers import EVENT_ID, RFC3339_Z, all_rows
from tests.factories import add_key, make_tenant

EVENTS = "/v1/events"


def _publish(client: Any, tenant: Any, body: dict[str, Any]) -> Any:
    return client.post(EVENTS, json=body, headers=tenant.headers)


def _deliveries_of(database: Any, event_id: str) -> list[Delivery]:
    return [row for row in all_rows(database, Delivery) if row.event_id == event_id]


def test_one_delivery_per_active_live_subscribed_endpoint(client, database):
    tenant = make_tenant(database)
    other = make_tenant(database, name="Other")
    both = create(client, tenant, events=["brand.vetted", "wallet.balance_low"])
    brand = create(client, tenant, events=["brand.vetted"])
    wallet = create(client, tenant, events=["wallet.balance_low"])
    paused = create(client, tenant, events=["brand.vetted"])
    deleted = create(client, tenant, events=["brand.vetted"])
    foreign = create(client, other, events=["brand.vetted"])
    patched = client.patch(
        f"/v1/webhooks/{paused['id']}", json={"active": False}, headers=tenant.headers
    )
    assert patched.status_code == 200
    assert patched.json()["active"] is False
    assert client.delete(f"/v1/webhooks/{deleted['id']}", headers=tenant.headers).status_code == 204

    response = _publish(client, tenant, {"type": "brand.vetted", "data": {"brand": "b_1"}})
    assert response.status_code == 202, response.text
    body = response.json()
    assert set(body) == {"id", "type", "created_at", "deliveries"}
    assert EVENT_ID.match(body["id"]), body["id"]
    assert body["type"] == "brand.vetted"
    assert RFC3339_Z.match(body["created_at"]), body["created_at"]
    assert {d["endpoint_id"] for d in body["deliveries"]} == {both["id"], brand["id"]}
    assert len(body["deliveries"]) == 2

    rows = _deliveries_of(database, body["id"])
    assert {str(row.id) for row in rows} == {d["id"] for d in body["deliveries"]}
    for row in rows:
        assert row.org_id == tenant.org_id
        assert row.state == DeliveryState.PENDING
        assert row.kind == DeliveryKind.EVENT
        assert row.attempts == 0
        assert row.next_attempt_at is not None
    # Nothing for the paused, deleted, unsubscribed or foreign endpoints, in any event.
    targeted = {str(row.endpoint_id) for row in all_rows(database, Delivery)}
    assert targeted == {both["id"], brand["id"]}
    assert {paused["id"], deleted["id"], wallet["id"], foreign["id"]}.isdisjoint(targeted)

    (stored,) = [row for row in all_rows(database, Event) if row.id == body["id"]]
    assert stored.org_id == tenant.org_id
    assert stored.type == "brand.vetted"
    assert stored.data == {"brand": "b_1"}

    second = _publish(client, tenant, {"type": "wallet.balance_low", "data": {"cents": 12}})
    assert second.status_code == 202, second.text
    endpoints = {d["endpoint_id"] for d in second.json()["deliveries"]}
    assert endpoints == {both["id"], wallet["id"]}


def test_reactivated_endpoint_receives_again(client, database):
    tenant = make_tenant(database)
    endpoint = create(client, tenant, events=["brand.vetted"])
    url = f"/v1/webhooks/{endpoint['id']}"
    client.patch(url, json={"active": False}, headers=tenant.headers)
    paused = _publish(client, tenant, {"type": "brand.vetted", "data": {}})
    assert paused.json()["deliveries"] == []
    client.patch(url, json={"active": True}, headers=tenant.headers)
    resumed = _publish(client, tenant, {"type": "brand.vetted", "data": {}})
    assert [d["endpoint_id"] for d in resumed.json()["deliveries"]] == [endpoint["id"]]


def test_no_subscriber_still_records_the_event(client, database):
    tenant = make_tenant(database)
    create(client, tenant, events=["brand.vetted"])
    response = _publish(client, tenant, {"type": "lookup.completed", "data": {"n": 1}})
    assert response.status_code == 202, response.text
    assert response.json()["deliveries"] == []
    assert [row.id for row in all_rows(database, Event)] == [response.json()["id"]]
    assert all_rows(database, Delivery) == []


def test_data_defaults_to_an_empty_object(client, database):
    tenant = make_tenant(database)
    response = _publish(client, tenant, {"type": "brand.vetted"})
    assert response.status_code == 202, response.text
    (stored,) = all_rows(database, Event)
    assert stored.data == {}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "brand.unknown", "data": {}}, "type"),
        ({"type": "webhook.test", "data": {}}, "type"),
        ({"type": "webhook.secret_handoff", "data": {}}, "type"),
        ({"type": "", "data": {}}, "type"),
        ({"type": 7, "data": {}}, "type"),
        ({"data": {}}, "type"),
        ({"type": "brand.vetted", "data": []}, "data"),
        ({"type": "brand.vetted", "data": "text"}, "data"),
        ({"type": "brand.vetted", "data": 1}, "data"),
        ({"type": "brand.vetted", "data": None}, "data"),
        ({"type": "brand.vetted", "data": {}, "extra": 1}, "extra"),
    ],
)
def test_invalid_event_is_422_and_creates_nothing(client, database, body, field):
    tenant = make_tenant(database)
    create(client, tenant, events=["brand.vetted"])
    details = assert_validation(_publish(client, tenant, body), field)
    assert details[field]
    assert all_rows(database, Event) == []
    assert all_rows(database, Delivery) == []


def test_body_must_be_a_json_object(client, database):
    tenant = make_tenant(database)
    response = client.post(EVENTS, content=b"[1, 2]", headers=tenant.headers)
    assert_validation(response, "body")
    assert all_rows(database, Event) == []


@pytest.mark.parametrize("event_type", ["webhook.test", "webhook.secret_handoff", "nope"])
def test_domain_refuses_unsubscribable_types(database, event_type):
    tenant = make_tenant(database)
    with pytest.raises(ValidationFailed) as raised, database.session() as session:
        deliveries.publish(session, tenant.org_id, event_type, {})
    assert raised.value.details is not None
    assert "type" in raised.value.details
    assert all_rows(database, Event) == []


def test_publish_needs_a_key(client, database):
    tenant = make_tenant(database)
    create(client, tenant, events=["brand.vetted"])
    body = {"type": "brand.vetted", "data": {}}
    assert_error(client.post(EVENTS, json=body), 401, "UNAUTHORIZED", "authentication failed")
    bad = {"Authorization": "Bearer am_live_" + "x" * 34}
    assert_error(client.post(EVENTS, json=body, headers=bad), 401, "UNAUTHORIZED")
    assert all_rows(database, Event) == []


def test_publish_needs_events_write(client, database):
    tenant = make_tenant(database)
    create(client, tenant, events=["brand.vetted"])
    body = {"type": "brand.vetted", "data": {}}
    webhooks_only = add_key(
        database, tenant, ["webhooks:read", "webhooks:write", "org:admin:write"]
    )
    response = client.post(EVENTS, json=body, headers=webhooks_only.headers)
    assert_error(response, 403, "FORBIDDEN", "missing required scope")
    assert all_rows(database, Event) == []
    # Auth is settled before the body: a bad body from a key without the scope is still 403.
    bad_body = client.post(EVENTS, json={"type": 1}, headers=webhooks_only.headers)
    assert_error(bad_body, 403, "FORBIDDEN")

    publisher = add_key(database, tenant, ["events:write"])
    allowed = client.post(EVENTS, json=body, headers=publisher.headers)
    assert allowed.status_code == 202, allowed.text
    assert len(allowed.json()["deliveries"]) == 1
    assert uuid.UUID(allowed.json()["deliveries"][0]["id"]).version == 7
