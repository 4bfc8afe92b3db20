"""Safe migrate end to end: a real worker, a real receiver that verifies signatures."""

import time

import pytest

from tests.factories import make_tenant

pytestmark = pytest.mark.e2e

E2E_OVERRIDES = {"migrate_backoff_initial_seconds": 0.2, "migrate_backoff_max_seconds": 0.5}


def _wait_state(client, tenant, operation_id, states, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/operations/{operation_id}", headers=tenant.headers).json()
        if body["state"] in states:
            return body
        time.sleep(0.1)
    raise TimeoutError(f"operation stayed {body['state']}: {body}")


def test_happy_path_waits_for_the_receiver_then_swaps_the_endpoint(
    client, database, workers, demo_receiver
):
    tenant = make_tenant(database)
    old = client.post(
        "/v1/webhooks",
        json={"url": demo_receiver.url, "events": ["brand.vetted", "wallet.balance_low"]},
        headers=tenant.headers,
    ).json()
    demo_receiver.set_secrets([old["secret"]])  # the receiver knows only the old secret

    started = client.post(f"/v1/webhooks/{old['id']}/migrate", headers=tenant.headers)
    assert started.status_code == 202, started.text
    operation = started.json()
    assert operation["secret_displayed_once"] is True
    waiting = _wait_state(client, tenant, operation["id"], {"awaiting_receiver"})
    assert waiting["steps"][2]["last_error"] == "receiver answered 401"

    demo_receiver.add_secret(operation["secret"])  # the operator installs the new secret
    done = _wait_state(client, tenant, operation["id"], {"succeeded", "rolled_back", "failed"})
    assert done["state"] == "succeeded", done
    assert [step["state"] for step in done["steps"]] == ["succeeded"] * 4
    assert client.get(f"/v1/webhooks/{old['id']}", headers=tenant.headers).status_code == 404
    new = client.get(f"/v1/webhooks/{done['new_endpoint_id']}", headers=tenant.headers).json()
    assert new["url"] == old["url"]
    assert new["events"] == old["events"]

    # The new endpoint signs with the minted secret: only it verifies from now on.
    demo_receiver.set_secrets([operation["secret"]])
    test = client.post(f"/v1/webhooks/{new['id']}/test", headers=tenant.headers).json()
    assert test["outcome"] == "success"
