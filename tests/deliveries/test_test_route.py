"""POST /v1/webhooks/{id}/test: a signed ``webhook.test`` sent synchronously (docs/api.md)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from models.delivery import Delivery, DeliveryKind, DeliveryState, Event
from receiver import BadSignature, verify
from tests.api.helpers import assert_error
from tests.deliveries.helpers import EVENT_ID, MISSING_ID, all_rows, exactly
from tests.factories import add_key, make_tenant
from tests.receivers import scripted_receiver
from tests.support import overridden
from workers.deliveries import attempt

RESULT_KEYS = {
    "event_id",
    "outcome",
    "url",
    "response_status",
    "response_time_ms",
    "response_body_excerpt",
    "error",
}


def _endpoint(client: Any, settings: Any, tenant: Any, url: str) -> dict[str, Any]:
    """An endpoint created through the API; http:// loopback URLs allowed for the call."""
    with overridden(settings, allow_insecure_urls=True):
        response = client.post(
            "/v1/webhooks", json={"url": url, "events": ["brand.vetted"]}, headers=tenant.headers
        )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def _test(client: Any, tenant: Any, endpoint_id: str) -> Any:
    return client.post(f"/v1/webhooks/{endpoint_id}/test", headers=tenant.headers)


def _result(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == RESULT_KEYS
    assert EVENT_ID.match(body["event_id"]), body
    assert isinstance(body["response_time_ms"], int)
    assert body["response_time_ms"] >= 0
    return body


def test_success_sends_a_signed_test_event_and_logs_it(client, database, settings):
    tenant = make_tenant(database)
    with overridden(settings, allow_insecure_urls=True), scripted_receiver() as receiver:
        endpoint = _endpoint(client, settings, tenant, receiver.url)
        body = _result(_test(client, tenant, endpoint["id"]))
        (got,) = exactly(receiver, 1)
    assert body["outcome"] == "success"
    assert body["url"] == receiver.url
    assert body["response_status"] == 200
    assert body["response_body_excerpt"] == '{"ok": true}'
    assert body["error"] is None

    sent = json.loads(got.body)
    assert set(sent) == {"id", "type", "api_version", "created_at", "org_id", "data"}
    assert sent["id"] == body["event_id"]
    assert sent["type"] == "webhook.test"
    assert sent["org_id"] == str(tenant.org_id)
    assert sent["api_version"] == endpoint["api_version"]
    assert sent["data"]["endpoint_id"] == endpoint["id"]
    assert verify(got.headers, got.body, [endpoint["secret"]], scheme="amcore").scheme == "amcore"
    standard = verify(got.headers, got.body, [endpoint["secret"]], scheme="standard")
    assert standard.msg_id == body["event_id"]

    listed = client.get(
        "/v1/webhooks/deliveries", params={"event_type": "webhook.test"}, headers=tenant.headers
    )
    assert listed.status_code == 200, listed.text
    (logged,) = listed.json()["data"]
    assert logged["event_id"] == body["event_id"]
    assert logged["endpoint_id"] == endpoint["id"]
    assert logged["event_type"] == "webhook.test"
    assert logged["outcome"] == "success"
    assert logged["response_status"] == 200
    assert logged["attempt"] == 1
    assert logged["url"] == receiver.url
    assert endpoint["secret"] not in json.dumps(logged)
    (row,) = all_rows(database, Delivery)
    assert row.kind == DeliveryKind.TEST
    assert row.state == DeliveryState.SUCCEEDED
    assert row.event_id == body["event_id"]


def test_test_event_is_signed_with_the_rotated_secret(client, database, settings):
    tenant = make_tenant(database)
    with overridden(settings, allow_insecure_urls=True), scripted_receiver() as receiver:
        endpoint = _endpoint(client, settings, tenant, receiver.url)
        rotated = client.post(
            f"/v1/webhooks/{endpoint['id']}/rotate-secret", headers=tenant.headers
        )
        assert rotated.status_code == 200, rotated.text
        assert _result(_test(client, tenant, endpoint["id"]))["outcome"] == "success"
        (got,) = exactly(receiver, 1)
    verify(got.headers, got.body, [rotated.json()["secret"]], scheme="standard")
    verify(got.headers, got.body, [rotated.json()["secret"]], scheme="amcore")
    with pytest.raises(BadSignature):
        verify(got.headers, got.body, [endpoint["secret"]], scheme="amcore")


def test_receiver_error_is_dead_and_not_retried(client, database, settings):
    tenant = make_tenant(database)
    with (
        overridden(settings, allow_insecure_urls=True),
        scripted_receiver(default_status=500) as receiver,
    ):
        endpoint = _endpoint(client, settings, tenant, receiver.url)
        body = _result(_test(client, tenant, endpoint["id"]))
        (row,) = all_rows(database, Delivery)
        assert attempt(database, row.id) is None  # a test delivery gets exactly one attempt
        exactly(receiver, 1)
    assert body["outcome"] == "dead"
    assert body["response_status"] == 500
    assert body["response_body_excerpt"] == '{"ok": false}'
    assert body["error"] is None
    (row,) = all_rows(database, Delivery)
    assert row.state == DeliveryState.DEAD
    assert row.next_attempt_at is None


def test_unreachable_receiver_is_dead_with_an_error(client, database, settings):
    tenant = make_tenant(database)
    with scripted_receiver() as receiver:
        url = receiver.url
    with overridden(settings, allow_insecure_urls=True):
        endpoint = _endpoint(client, settings, tenant, url)  # nothing listens there any more
        body = _result(_test(client, tenant, endpoint["id"]))
    assert body["outcome"] == "dead"
    assert body["response_status"] is None
    assert body["error"] == "connection refused"
    assert body["response_body_excerpt"] == ""
    assert body["url"] == url


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_loopback_destination_is_blocked_without_insecure_urls(client, database, settings, host):
    tenant = make_tenant(database)
    assert settings.allow_insecure_urls is False
    with scripted_receiver() as receiver:
        url = f"https://{host}:{receiver.port}/"
        created = client.post(
            "/v1/webhooks", json={"url": url, "events": ["brand.vetted"]}, headers=tenant.headers
        )
        assert created.status_code == 201, created.text  # an https URL passes validation
        body = _result(_test(client, tenant, created.json()["id"]))
        exactly(receiver, 0)
    assert body["outcome"] == "dead"
    assert body["response_status"] is None
    assert body["error"].startswith("blocked destination"), body


def test_plain_http_is_refused_once_insecure_urls_are_off(client, database, settings):
    tenant = make_tenant(database)
    with scripted_receiver() as receiver:
        with overridden(settings, allow_insecure_urls=True):
            endpoint = _endpoint(client, settings, tenant, receiver.url)
        body = _result(_test(client, tenant, endpoint["id"]))
        exactly(receiver, 0)
    assert body["outcome"] == "dead"
    assert body["error"] == "blocked destination: https required"


def test_paused_endpoint_still_gets_its_test(client, database, settings):
    """Pausing stops event deliveries; the endpoint still exists, so it is no 404."""
    tenant = make_tenant(database)
    with overridden(settings, allow_insecure_urls=True), scripted_receiver() as receiver:
        endpoint = _endpoint(client, settings, tenant, receiver.url)
        paused = client.patch(
            f"/v1/webhooks/{endpoint['id']}", json={"active": False}, headers=tenant.headers
        )
        assert paused.status_code == 200, paused.text
        body = _result(_test(client, tenant, endpoint["id"]))
        exactly(receiver, 1)
    assert body["outcome"] == "success"


def test_unknown_foreign_and_deleted_endpoints_are_404(client, database):
    tenant = make_tenant(database)
    other = make_tenant(database, name="Other")
    foreign = client.post(
        "/v1/webhooks",
        json={"url": "https://hooks.example.com/x", "events": ["brand.vetted"]},
        headers=other.headers,
    ).json()
    deleted = client.post(
        "/v1/webhooks",
        json={"url": "https://hooks.example.com/y", "events": ["brand.vetted"]},
        headers=tenant.headers,
    ).json()
    assert client.delete(f"/v1/webhooks/{deleted['id']}", headers=tenant.headers).status_code == 204
    for endpoint_id in (foreign["id"], deleted["id"], MISSING_ID):
        assert_error(_test(client, tenant, endpoint_id), 404, "NOT_FOUND", "not found")
    assert all_rows(database, Event) == []
    assert all_rows(database, Delivery) == []


def test_test_route_needs_webhooks_write(client, database):
    tenant = make_tenant(database)
    endpoint = client.post(
        "/v1/webhooks",
        json={"url": "https://hooks.example.com/x", "events": ["brand.vetted"]},
        headers=tenant.headers,
    ).json()
    url = f"/v1/webhooks/{endpoint['id']}/test"
    assert_error(client.post(url), 401, "UNAUTHORIZED", "authentication failed")
    reader = add_key(database, tenant, ["webhooks:read", "events:write"])
    assert_error(
        client.post(url, headers=reader.headers), 403, "FORBIDDEN", "missing required scope"
    )
    assert_error(
        client.post(f"/v1/webhooks/{uuid.uuid4()}/test", headers=reader.headers), 403, "FORBIDDEN"
    )
    assert all_rows(database, Event) == []
