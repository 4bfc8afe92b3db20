"""Deliveries end to end: a real worker, a real receiver on loopback, both signature schemes."""

import base64
import time

import pytest
from standardwebhooks.webhooks import Webhook

from receiver import BadSignature, verify
from tests.factories import make_tenant
from tests.receivers import scripted_receiver

pytestmark = pytest.mark.e2e


def _endpoint(client, tenant, url, events=("brand.vetted",)):
    created = client.post(
        "/v1/webhooks", json={"url": url, "events": list(events)}, headers=tenant.headers
    )
    assert created.status_code == 201, created.text
    return created.json()


def _publish(client, tenant, event_type="brand.vetted", data=None):
    published = client.post(
        "/v1/events",
        json={"type": event_type, "data": data or {"brand": "b_1"}},
        headers=tenant.headers,
    )
    assert published.status_code == 202, published.text
    return published.json()


def _attempts(client, tenant, **params):
    listed = client.get("/v1/webhooks/deliveries", params=params, headers=tenant.headers)
    assert listed.status_code == 200, listed.text
    return sorted(listed.json()["data"], key=lambda item: (item["occurred_at"], item["attempt"]))


def _wait_attempts(client, tenant, count, timeout=20.0, **params):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        attempts = _attempts(client, tenant, **params)
        if len(attempts) >= count:
            return attempts
        time.sleep(0.1)
    raise TimeoutError(f"only {len(attempts)} attempts recorded")


def test_published_event_is_delivered_signed_and_verifiable(client, database, workers):
    tenant = make_tenant(database)
    with scripted_receiver() as receiver:
        endpoint = _endpoint(client, tenant, receiver.url)
        other = _endpoint(client, tenant, receiver.url, events=("wallet.balance_low",))
        event = _publish(client, tenant, data={"brand": "b_1", "note": "ünïcode"})
        assert [d["endpoint_id"] for d in event["deliveries"]] == [endpoint["id"]]
        (got,) = receiver.wait_for(1)
        attempts = _wait_attempts(client, tenant, 1)
    body = got.event
    assert body["id"] == event["id"]
    assert body["type"] == "brand.vetted"
    assert body["org_id"] == str(tenant.org_id)
    assert body["api_version"] == "2026-04-01"
    assert body["data"] == {"brand": "b_1", "note": "ünïcode"}
    # Both schemes verify with the endpoint's secret, and the independent library agrees.
    assert verify(got.headers, got.body, [endpoint["secret"]], scheme="standard").scheme
    assert verify(got.headers, got.body, [endpoint["secret"]], scheme="amcore").scheme
    Webhook(endpoint["secret"]).verify(got.body, got.headers)
    with pytest.raises(BadSignature):
        verify(got.headers, got.body, [other["secret"]], scheme="standard")
    (logged,) = attempts
    assert logged["outcome"] == "success"
    assert logged["response_status"] == 200
    assert logged["event_id"] == event["id"]
    assert logged["attempt"] == 1
    assert endpoint["secret"] not in str(logged)


def test_receiver_failure_is_retried_then_succeeds(client, database, workers):
    tenant = make_tenant(database)
    with scripted_receiver() as receiver:
        receiver.answer(500)
        _endpoint(client, tenant, receiver.url)
        event = _publish(client, tenant)
        first, second = receiver.wait_for(2)
        attempts = _wait_attempts(client, tenant, 2)
    assert [a["outcome"] for a in attempts] == ["retry", "success"]
    assert [a["response_status"] for a in attempts] == [500, 200]
    # The same event, re-signed with its own timestamp on each attempt.
    assert first.body == second.body
    assert first.event["id"] == event["id"]
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == event["id"]


def test_unreachable_receiver_is_dead_after_the_schedule(client, database, workers):
    tenant = make_tenant(database)
    with scripted_receiver() as receiver:
        url = receiver.url
    _endpoint(client, tenant, url)  # the port is closed now: every attempt fails to connect
    _publish(client, tenant)
    schedule = workers.settings.delivery_retry_schedule
    attempts = _wait_attempts(client, tenant, len(schedule) + 1)
    assert [a["outcome"] for a in attempts] == ["retry"] * len(schedule) + ["dead"]
    assert all(a["response_status"] is None and a["error"] for a in attempts)
    time.sleep(1.0)
    assert len(_attempts(client, tenant)) == len(schedule) + 1  # nothing after dead


def test_after_rotate_secret_the_next_delivery_uses_only_the_new_secret(client, database, workers):
    tenant = make_tenant(database)
    with scripted_receiver() as receiver:
        endpoint = _endpoint(client, tenant, receiver.url)
        rotated = client.post(
            f"/v1/webhooks/{endpoint['id']}/rotate-secret", headers=tenant.headers
        ).json()
        _publish(client, tenant)
        (got,) = receiver.wait_for(1)
    verify(got.headers, got.body, [rotated["secret"]])
    with pytest.raises(BadSignature):
        verify(got.headers, got.body, [endpoint["secret"]])
    assert base64.b64decode(rotated["secret"]) != base64.b64decode(endpoint["secret"])
