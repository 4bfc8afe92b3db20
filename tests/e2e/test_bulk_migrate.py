"""Bulk migrate end to end: ``rotator api`` and a real worker (in the real pass), a receiver
that verifies signatures, the operator installing each child's new secret from the 202."""

import time

import pytest

from tests.factories import make_tenant

pytestmark = pytest.mark.e2e

E2E_OVERRIDES = {"migrate_backoff_initial_seconds": 0.2, "migrate_backoff_max_seconds": 0.5}


def test_four_endpoints_two_at_a_time_all_swapped(client, database, workers, demo_receiver):
    tenant = make_tenant(database)
    old = [
        client.post(
            "/v1/webhooks",
            json={"url": demo_receiver.url, "events": ["brand.vetted"]},
            headers=tenant.headers,
        ).json()
        for _ in range(4)
    ]
    demo_receiver.set_secrets([endpoint["secret"] for endpoint in old])

    started = client.post(
        "/v1/webhooks/migrate", json={"max_concurrency": 2}, headers=tenant.headers
    )
    assert started.status_code == 202, started.text
    parent = started.json()
    assert {item["source_endpoint_id"] for item in parent["secrets"]} == {e["id"] for e in old}
    for item in parent["secrets"]:  # the operator installs every new secret at once
        demo_receiver.add_secret(item["secret"])

    most_active = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        body = client.get(f"/v1/operations/{parent['id']}", headers=tenant.headers).json()
        counts = body["children"]
        most_active = max(most_active, counts["running"] + counts["awaiting_receiver"])
        if body["finished_at"] is not None:
            break
        time.sleep(0.05)
    assert body["state"] == "succeeded", body
    assert counts["succeeded"] == 4
    assert most_active <= 2
    children = client.get(
        "/v1/operations", params={"parent_id": parent["id"]}, headers=tenant.headers
    ).json()["data"]
    assert {child["state"] for child in children} == {"succeeded"}
    for endpoint in old:
        gone = client.get(f"/v1/webhooks/{endpoint['id']}", headers=tenant.headers)
        assert gone.status_code == 404
