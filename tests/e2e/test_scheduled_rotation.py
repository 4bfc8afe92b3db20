"""Scheduled rotation with the in-band handoff: nobody at the keyboard (real worker and beat)."""

import time
from datetime import UTC, datetime

import pytest

from receiver import DemoReceiver, serve
from tests.factories import make_tenant

pytestmark = pytest.mark.e2e

INTERVAL_S = 4
E2E_OVERRIDES = {
    "policy_min_interval_seconds": 1,
    "migrate_backoff_initial_seconds": 0.2,
    "migrate_backoff_max_seconds": 0.5,
}


def _wait(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(what)


def test_in_band_policy_rotates_unattended_twice(client, database, workers):
    tenant = make_tenant(database)
    receiver = DemoReceiver(["A" * 43 + "="])
    server = serve(receiver, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
    try:
        first = client.post(
            "/v1/webhooks", json={"url": url, "events": ["brand.vetted"]}, headers=tenant.headers
        ).json()
        receiver.set_secrets([first["secret"]])  # the receiver knows the first secret only
        policy = client.post(
            "/v1/rotation-policies",
            json={
                "target": "endpoint",
                "endpoint_id": first["id"],
                "strategy": "safe_migrate",
                "interval_seconds": INTERVAL_S,
                "handoff": "in_band",
                "next_run_at": datetime.now(UTC).isoformat(),
            },
            headers=tenant.headers,
        )
        assert policy.status_code == 201, policy.text
        policy_id = policy.json()["id"]

        def succeeded_runs():
            listed = client.get(
                "/v1/operations", params={"kind": "scheduled_rotation"}, headers=tenant.headers
            ).json()["data"]
            return [op for op in listed if op["state"] == "succeeded"]

        (run,) = _wait(succeeded_runs, what="first scheduled rotation")
        assert run["trigger"] == "schedule"
        assert run["policy_id"] == policy_id
        assert run["source_endpoint_id"] == first["id"]
        second_id = run["new_endpoint_id"]
        assert client.get(f"/v1/webhooks/{first['id']}", headers=tenant.headers).status_code == 404
        followed = client.get(f"/v1/rotation-policies/{policy_id}", headers=tenant.headers).json()
        assert followed["endpoint_id"] == second_id
        assert followed["last_run_at"] is not None
        assert len(receiver.secrets()) == 2  # the handoff installed the new secret by itself

        # The next due time rotates the new endpoint the same way.
        runs = _wait(lambda: len(succeeded_runs()) >= 2 and succeeded_runs(), what="second run")
        latest = runs[0]
        assert latest["source_endpoint_id"] == second_id
        assert len(receiver.secrets()) == 3
        # The receiver verifies deliveries to the newest endpoint with the secret it was handed.
        test = client.post(
            f"/v1/webhooks/{latest['new_endpoint_id']}/test", headers=tenant.headers
        ).json()
        assert test["outcome"] == "success"
        receiver.set_secrets([receiver.secrets()[0]])  # newest only
        assert (
            client.post(
                f"/v1/webhooks/{latest['new_endpoint_id']}/test", headers=tenant.headers
            ).json()["outcome"]
            == "success"
        )
        # Nobody revealed anything: the scheduled secrets were never shown by an API response.
        assert "secret" not in latest
    finally:
        server.shutdown()
        server.server_close()


def test_org_endpoints_policy_migrates_every_endpoint_unattended(client, database, workers):
    tenant = make_tenant(database)
    receiver = DemoReceiver(["A" * 43 + "="])
    server = serve(receiver, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
    try:
        old = [
            client.post(
                "/v1/webhooks",
                json={"url": url, "events": ["brand.vetted"]},
                headers=tenant.headers,
            ).json()
            for _ in range(3)
        ]
        receiver.set_secrets([endpoint["secret"] for endpoint in old])
        policy = client.post(
            "/v1/rotation-policies",
            json={
                "target": "org_endpoints",
                "interval_seconds": 3600,
                "handoff": "in_band",
                "max_concurrency": 2,
                "next_run_at": datetime.now(UTC).isoformat(),
            },
            headers=tenant.headers,
        )
        assert policy.status_code == 201, policy.text
        assert policy.json()["strategy"] == "safe_migrate"
        assert policy.json()["max_concurrency"] == 2

        def finished_bulk():
            listed = client.get(
                "/v1/operations", params={"kind": "bulk_migrate"}, headers=tenant.headers
            ).json()["data"]
            return [op for op in listed if op["finished_at"] is not None]

        (run,) = _wait(finished_bulk, timeout=45, what="the scheduled bulk migrate")
        assert run["state"] == "succeeded", run
        assert run["trigger"] == "schedule"
        assert run["policy_id"] == policy.json()["id"]
        assert run["children"]["succeeded"] == 3
        for endpoint in old:
            gone = client.get(f"/v1/webhooks/{endpoint['id']}", headers=tenant.headers)
            assert gone.status_code == 404
        assert len(receiver.secrets()) == 6  # each handoff installed its new secret by itself
    finally:
        server.shutdown()
        server.server_close()
