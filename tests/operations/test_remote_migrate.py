"""Remote migrate (docs/architecture.md, "Remote migrate"): the remote provider is a Rotator API
served over real HTTP (it serves the AgentMessage API), reached through a loopback proxy that
can answer in its place or lose its answers. The remote account is another organization.

Steps are driven with ``workers.operations.advance`` one call at a time, as in test_advance.py,
so each test decides when the operation moves, and duplicates are sent on purpose.
"""

from __future__ import annotations

import base64
import logging
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from models import clock, remote
from models.endpoint import WebhookEndpoint, signing_key
from models.operation import Operation
from models.org import revoke_key
from models.policy import RotationPolicy
from models.policy_runs import run_due
from models.provider import Provider
from tests.factories import Tenant, add_key, make_tenant
from tests.live import serve_api
from tests.providers import ProviderProxy, provider_proxy
from tests.receivers import ScriptedReceiver
from tests.support import overridden
from workers.operations import advance
from workers.remote import perform


@pytest.fixture
def remote_tenant(database) -> Tenant:
    return make_tenant(database, name="Remote account")


@pytest.fixture
def remote_api(loopback) -> Iterator[str]:
    with overridden(loopback, provider_timeout_seconds=10.0), serve_api("remote-api") as url:
        yield url


@pytest.fixture
def proxy(remote_api: str) -> Iterator[ProviderProxy]:
    with provider_proxy(remote_api) as running:
        yield running


def remote_call(remote_api: str, tenant: Tenant, method: str, path: str, **kwargs: Any):
    with httpx.Client(base_url=remote_api, headers=tenant.headers, timeout=30) as http:
        return http.request(method, path, **kwargs)


def remote_endpoint(remote_api: str, tenant: Tenant, url: str) -> dict[str, Any]:
    created = remote_call(
        remote_api,
        tenant,
        "POST",
        "/v1/webhooks",
        json={"url": url, "events": ["brand.vetted"], "description": "at the provider"},
    )
    assert created.status_code == 201, created.text
    body: dict[str, Any] = created.json()
    return body


def remote_ids(remote_api: str, tenant: Tenant) -> set[str]:
    listed = remote_call(remote_api, tenant, "GET", "/v1/webhooks", params={"limit": 100})
    assert listed.status_code == 200, listed.text
    return {item["id"] for item in listed.json()["data"]}


def register(client, tenant: Tenant, proxy: ProviderProxy, remote_tenant: Tenant) -> str:
    created = client.post(
        "/v1/providers",
        json={"name": "AgentMessage", "base_url": proxy.url, "api_key": remote_tenant.api_key},
        headers=tenant.headers,
    )
    assert created.status_code == 201, created.text
    provider_id: str = created.json()["id"]
    return provider_id


def migrate(client, tenant: Tenant, provider_id: str, remote_id: str, **body: Any):
    return client.post(
        f"/v1/providers/{provider_id}/webhooks/{remote_id}/migrate",
        json={"deadline_seconds": 60, **body},
        headers=tenant.headers,
    )


def load(database, operation_id: str | uuid.UUID) -> Operation:
    with database.session() as session:
        row = session.get(Operation, uuid.UUID(str(operation_id)))
        assert row is not None
        return row


def drive(database, operation_id: str, *, rounds: int = 30, travel: float = 0.0) -> Operation:
    """Advance until the operation ends (moving the clock by ``travel`` between calls)."""
    for _ in range(rounds):
        operation = load(database, operation_id)
        if operation.finished:
            return operation
        advance(database, operation.id)
        advance(database, operation.id)  # a duplicate message: must change nothing
        if travel:
            clock.travel(timedelta(seconds=travel))
    raise AssertionError(f"operation did not end: {load(database, operation_id).state}")


def secret_at_remote(database, remote_id: str) -> bytes:
    with database.session() as session:
        endpoint = session.get(WebhookEndpoint, uuid.UUID(remote_id))
        assert endpoint is not None
        return signing_key(session, endpoint)


@pytest.fixture
def old(remote_api, remote_tenant, accepting: ScriptedReceiver) -> dict[str, Any]:
    return remote_endpoint(remote_api, remote_tenant, accepting.url)


# --- providers ------------------------------------------------------------------------------------


def test_a_provider_is_registered_with_a_key_the_remote_accepts_and_never_shows_it(
    client, database, tenant, remote_tenant, proxy, old
):
    provider_id = register(client, tenant, proxy, remote_tenant)
    assert proxy.calls("GET", "/v1/webhooks")  # the key was tried before it was stored
    shown = client.get(f"/v1/providers/{provider_id}", headers=tenant.headers)
    assert shown.status_code == 200
    assert remote_tenant.api_key not in shown.text
    assert shown.json()["key_prefix"] == remote_tenant.api_key[:12]
    with database.session() as session:
        row = session.get(Provider, uuid.UUID(provider_id))
        assert row is not None
        assert row.key_ciphertext is not None
        assert remote_tenant.api_key.encode() not in row.key_ciphertext
    listed = client.get(f"/v1/providers/{provider_id}/webhooks", headers=tenant.headers)
    assert listed.status_code == 200, listed.text
    assert [item["id"] for item in listed.json()["data"]] == [old["id"]]
    assert all("secret" not in item for item in listed.json()["data"])


def test_a_key_the_remote_refuses_or_a_remote_that_does_not_answer_is_a_422(
    client, database, tenant, remote_tenant, proxy
):
    refused = client.post(
        "/v1/providers",
        json={"name": "x", "base_url": proxy.url, "api_key": "am_live_" + "x" * 34},
        headers=tenant.headers,
    )
    assert refused.status_code == 422
    assert set(refused.json()["error"]["details"]) == {"api_key"}
    proxy.fail("GET", "/v1/webhooks", 503)
    down = client.post(
        "/v1/providers",
        json={"name": "x", "base_url": proxy.url, "api_key": remote_tenant.api_key},
        headers=tenant.headers,
    )
    assert down.status_code == 422
    assert set(down.json()["error"]["details"]) == {"base_url"}
    malformed = client.post(
        "/v1/providers",
        json={"name": "x", "base_url": "ftp://example.com", "api_key": "nope"},
        headers=tenant.headers,
    )
    assert malformed.status_code == 422
    assert set(malformed.json()["error"]["details"]) == {"base_url", "api_key"}
    assert remote_tenant.api_key not in down.text + refused.text
    with database.session() as session:
        assert session.scalars(select(Provider)).all() == []


def test_listing_through_a_provider_that_fails_is_a_502(client, tenant, remote_tenant, proxy, old):
    provider_id = register(client, tenant, proxy, remote_tenant)
    proxy.fail("GET", "/v1/webhooks", 500)
    listed = client.get(f"/v1/providers/{provider_id}/webhooks", headers=tenant.headers)
    assert listed.status_code == 502
    assert listed.json()["error"]["code"] == "PROVIDER_UNAVAILABLE"


# --- the migration ------------------------------------------------------------------------------


def test_a_remote_migrate_creates_tests_and_deletes_at_the_provider(
    client, database, tenant, remote_tenant, remote_api, proxy, old, accepting
):
    provider_id = register(client, tenant, proxy, remote_tenant)
    started = migrate(client, tenant, provider_id, old["id"])
    assert started.status_code == 202, started.text
    body = started.json()
    assert body["kind"] == "remote_migrate"
    assert body["provider_id"] == provider_id
    assert body["source_endpoint_id"] == old["id"]
    assert "secret" not in body
    early = client.post(f"/v1/operations/{body['id']}/reveal-secret", headers=tenant.headers)
    assert early.status_code == 409
    assert int(early.headers["Retry-After"]) >= 1

    done = drive(database, body["id"])

    assert done.state == "succeeded", (done.error_code, done.error_message)
    new_id = done.remote_new_id
    assert new_id is not None
    assert remote_ids(remote_api, remote_tenant) == {new_id}
    new = remote_call(remote_api, remote_tenant, "GET", f"/v1/webhooks/{new_id}").json()
    assert (new["url"], new["events"], new["description"]) == (
        old["url"],
        old["events"],
        old["description"],
    )
    assert len(proxy.calls("POST", "/v1/webhooks")) == 1  # one create
    assert len(proxy.calls("DELETE", f"/v1/webhooks/{old['id']}")) == 1  # one delete
    assert accepting.received  # the provider tested the new endpoint with its receiver
    revealed = client.post(f"/v1/operations/{body['id']}/reveal-secret", headers=tenant.headers)
    assert revealed.status_code == 200, revealed.text
    assert base64.b64decode(revealed.json()["secret"]) == secret_at_remote(database, new_id)
    again = client.post(f"/v1/operations/{body['id']}/reveal-secret", headers=tenant.headers)
    assert again.status_code == 409
    shown = client.get(f"/v1/operations/{body['id']}", headers=tenant.headers).json()
    assert shown["new_endpoint_id"] == new_id
    assert [step["state"] for step in shown["steps"]] == ["succeeded"] * 4


def test_a_lost_create_answer_is_found_again_and_its_secret_rotated(
    client, database, tenant, remote_tenant, remote_api, proxy, old
):
    """The remote created the endpoint but its answer (the only one showing the secret) was
    lost: the retry finds it, rotates its secret there, and creates nothing more."""
    provider_id = register(client, tenant, proxy, remote_tenant)
    proxy.lose_answer("POST", "/v1/webhooks")
    operation_id = migrate(client, tenant, provider_id, old["id"]).json()["id"]

    done = drive(database, operation_id, travel=3)

    assert done.state == "succeeded", (done.error_code, done.error_message)
    assert len(proxy.calls("POST", "/v1/webhooks")) == 1
    assert proxy.calls("POST", f"/v1/webhooks/{done.remote_new_id}/rotate-secret")
    assert remote_ids(remote_api, remote_tenant) == {done.remote_new_id}
    revealed = client.post(f"/v1/operations/{operation_id}/reveal-secret", headers=tenant.headers)
    assert base64.b64decode(revealed.json()["secret"]) == secret_at_remote(
        database, str(done.remote_new_id)
    )


def test_429_and_503_from_the_provider_are_waited_out(
    client, database, tenant, remote_tenant, remote_api, proxy, old
):
    provider_id = register(client, tenant, proxy, remote_tenant)
    proxy.fail("GET", f"/v1/webhooks/{old['id']}", 429, headers={"Retry-After": "7"})
    proxy.fail("POST", "/v1/webhooks", 503, times=2)
    operation_id = migrate(client, tenant, provider_id, old["id"]).json()["id"]

    advance(database, uuid.UUID(operation_id))
    throttled = load(database, operation_id)
    assert throttled.next_advance_at is not None
    assert throttled.next_advance_at >= clock.now() + timedelta(seconds=6)
    advance(database, uuid.UUID(operation_id))  # early: nothing is called
    assert len(proxy.calls("GET", f"/v1/webhooks/{old['id']}")) == 1

    done = drive(database, operation_id, travel=8)

    assert done.state == "succeeded", (done.error_code, done.error_message)
    assert remote_ids(remote_api, remote_tenant) == {done.remote_new_id}


def test_past_the_deadline_the_new_remote_endpoint_is_deleted(
    client, database, tenant, remote_tenant, remote_api, proxy, refusing
):
    old = remote_endpoint(remote_api, remote_tenant, refusing.url)
    provider_id = register(client, tenant, proxy, remote_tenant)
    operation_id = migrate(client, tenant, provider_id, old["id"]).json()["id"]

    done = drive(database, operation_id, travel=10)

    assert done.state == "rolled_back"
    assert done.error_code == "DEADLINE_EXCEEDED"
    assert remote_ids(remote_api, remote_tenant) == {old["id"]}
    assert len(proxy.calls("DELETE")) == 1


def awaiting_receiver(
    client, database, tenant: Tenant, remote_tenant: Tenant, remote_api: str, proxy, url: str
) -> tuple[dict[str, Any], str, str]:
    """A remote migrate whose new endpoint exists and whose receiver refuses it: the old
    remote endpoint, the operation id, the new remote id."""
    old = remote_endpoint(remote_api, remote_tenant, url)
    provider_id = register(client, tenant, proxy, remote_tenant)
    operation_id = migrate(client, tenant, provider_id, old["id"]).json()["id"]
    for _ in range(5):
        advance(database, uuid.UUID(operation_id))
    waiting = load(database, operation_id)
    assert waiting.state == "awaiting_receiver"
    assert waiting.remote_new_id is not None
    return old, operation_id, waiting.remote_new_id


def test_cancel_deletes_the_new_remote_endpoint_and_keeps_the_old(
    client, database, tenant, remote_tenant, remote_api, proxy, refusing
):
    old, operation_id, _ = awaiting_receiver(
        client, database, tenant, remote_tenant, remote_api, proxy, refusing.url
    )

    canceled = client.post(f"/v1/operations/{operation_id}/cancel", headers=tenant.headers)
    assert canceled.status_code == 202, canceled.text
    done = drive(database, operation_id)

    assert done.state == "canceled"
    assert remote_ids(remote_api, remote_tenant) == {old["id"]}
    revealed = client.post(f"/v1/operations/{operation_id}/reveal-secret", headers=tenant.headers)
    assert revealed.status_code == 409  # the endpoint it named is gone, and so is its secret


def test_a_key_revoked_at_the_provider_fails_the_operation_naming_what_it_left(
    client, database, tenant, remote_tenant, remote_api, proxy, refusing
):
    _, operation_id, created = awaiting_receiver(
        client, database, tenant, remote_tenant, remote_api, proxy, refusing.url
    )
    with database.session() as session:
        revoke_key(session, remote_tenant.key_id)
    clock.travel(timedelta(seconds=10))  # past the remote's memory of the key, and the wait

    done = drive(database, operation_id, travel=10)

    assert done.state == "failed"
    assert done.error_code == "PROVIDER_UNAUTHORIZED"
    assert done.error_details is not None
    assert created in done.error_details["new_endpoint_id"]
    shown = client.get(f"/v1/operations/{operation_id}", headers=tenant.headers).json()
    assert created in shown["error"]["details"]["new_endpoint_id"]
    assert remote_tenant.api_key not in str(shown)


def test_an_old_endpoint_gone_at_the_provider_fails_with_not_found(
    client, database, tenant, remote_tenant, proxy
):
    provider_id = register(client, tenant, proxy, remote_tenant)
    missing = str(uuid.uuid4())
    operation_id = migrate(client, tenant, provider_id, missing).json()["id"]

    done = drive(database, operation_id)

    assert done.state == "failed"
    assert done.error_code == "NOT_FOUND"
    assert proxy.calls("POST", "/v1/webhooks") == []


def test_one_migration_per_remote_endpoint_and_a_provider_in_use_is_not_deleted(
    client, database, tenant, remote_tenant, proxy, old
):
    provider_id = register(client, tenant, proxy, remote_tenant)
    assert migrate(client, tenant, provider_id, old["id"]).status_code == 202
    second = migrate(client, tenant, provider_id, old["id"])
    assert second.status_code == 409
    busy = client.delete(f"/v1/providers/{provider_id}", headers=tenant.headers)
    assert busy.status_code == 409
    bad_id = migrate(client, tenant, provider_id, "no spaces allowed")
    assert bad_id.status_code in (404, 422)


def test_a_remote_endpoint_policy_migrates_on_schedule_and_follows_the_new_id(
    client, database, tenant, remote_tenant, remote_api, proxy, old
):
    provider_id = register(client, tenant, proxy, remote_tenant)
    created = client.post(
        "/v1/rotation-policies",
        json={
            "target": "remote_endpoint",
            "provider_id": provider_id,
            "remote_endpoint_id": old["id"],
            "interval_seconds": 3600,
            "next_run_at": clock.rfc3339(clock.now()),
        },
        headers=tenant.headers,
    )
    assert created.status_code == 201, created.text
    assert created.json()["remote_endpoint_id"] == old["id"]
    with database.session() as session:
        runs = run_due(session)
    assert len(runs) == 1
    assert runs[0].operation_id is not None

    done = drive(database, str(runs[0].operation_id))

    assert done.state == "succeeded"
    assert done.trigger == "schedule"
    with database.session() as session:
        policy = session.scalars(select(RotationPolicy)).one()
        assert policy.remote_endpoint_id == done.remote_new_id
    gone = client.delete(f"/v1/providers/{provider_id}", headers=tenant.headers)
    assert gone.status_code == 204
    with database.session() as session:
        assert session.scalars(select(RotationPolicy)).one().deleted_at is not None
        forgotten = session.get(Provider, uuid.UUID(provider_id))
        assert forgotten is not None
        assert forgotten.key_ciphertext is None  # a deleted provider keeps no key


def test_providers_need_org_admin_write_and_a_new_key_is_tried_first(
    client, database, tenant, remote_tenant, proxy
):
    writer = add_key(database, tenant, ["webhooks:write", "webhooks:read"])
    body = {"name": "AgentMessage", "base_url": proxy.url, "api_key": remote_tenant.api_key}
    assert client.post("/v1/providers", json=body, headers=writer.headers).status_code == 403
    provider_id = register(client, tenant, proxy, remote_tenant)
    path = f"/v1/providers/{provider_id}"
    assert client.patch(path, json={"name": "x"}, headers=writer.headers).status_code == 403
    renamed = client.patch(path, json={"name": "AgentMessage EU"}, headers=tenant.headers)
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["name"] == "AgentMessage EU"
    refused = client.patch(path, json={"api_key": "am_live_" + "r" * 34}, headers=tenant.headers)
    assert refused.status_code == 422
    assert set(refused.json()["error"]["details"]) == {"api_key"}
    other = add_key(database, remote_tenant, [])
    replaced = client.patch(path, json={"api_key": other.api_key}, headers=tenant.headers)
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["key_prefix"] == other.api_key[:12]
    listed = client.get("/v1/providers", headers=writer.headers)
    assert [item["id"] for item in listed.json()["data"]] == [provider_id]


def test_a_remote_migrate_replays_under_its_idempotency_key_and_logs_no_key(
    client, database, tenant, remote_tenant, proxy, old, caplog
):
    provider_id = register(client, tenant, proxy, remote_tenant)
    headers = {**tenant.headers, "Idempotency-Key": "remote-1"}
    path = f"/v1/providers/{provider_id}/webhooks/{old['id']}/migrate"
    first = client.post(path, json={"deadline_seconds": 60}, headers=headers)
    again = client.post(path, json={"deadline_seconds": 60}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    with caplog.at_level(logging.DEBUG):
        done = drive(database, first.json()["id"])
    assert done.state == "succeeded"
    calls = [record for record in caplog.records if record.getMessage() == "provider call"]
    assert {record.__dict__["method"] for record in calls} >= {"GET", "POST", "DELETE"}
    assert all(remote_tenant.api_key not in str(record.__dict__) for record in caplog.records)


def test_a_cancel_during_the_create_call_deletes_what_that_call_created(
    client, database, tenant, remote_tenant, remote_api, proxy, old
):
    """The cancel arrives while the create is at the provider: the operation stays leased
    until the answer is recorded (so the new endpoint is known), then rolls back at once."""
    provider_id = register(client, tenant, proxy, remote_tenant)
    operation_id = uuid.UUID(migrate(client, tenant, provider_id, old["id"]).json()["id"])
    advance(database, operation_id)  # lookup
    advance(database, operation_id)  # snapshot
    with database.session() as session:
        call, _ = remote.begin(session, operation_id)
    assert call is not None
    assert call.call == remote.Call.CREATE
    leased = load(database, operation_id).next_advance_at

    canceled = client.post(f"/v1/operations/{operation_id}/cancel", headers=tenant.headers)
    assert canceled.status_code == 202, canceled.text
    assert load(database, operation_id).next_advance_at == leased  # still leased
    calls_before = len(proxy.seen)
    advance(database, operation_id)  # the cancel's own wake-up: early, calls nothing
    assert len(proxy.seen) == calls_before
    reply = perform(database.settings, call)
    with database.session() as session:
        after = remote.record(session, operation_id, call, reply)
    assert after.again_in == 0.0
    done = drive(database, str(operation_id))

    assert done.state == "canceled"
    assert remote_ids(remote_api, remote_tenant) == {old["id"]}
    assert len(proxy.calls("POST", "/v1/webhooks")) == 1


def test_a_create_the_provider_refuses_fails_with_its_message_and_creates_nothing(
    client, database, tenant, remote_tenant, remote_api, proxy, old
):
    provider_id = register(client, tenant, proxy, remote_tenant)
    proxy.fail("POST", "/v1/webhooks", 422)
    operation_id = migrate(client, tenant, provider_id, old["id"]).json()["id"]

    done = drive(database, operation_id)

    assert done.state == "failed"
    assert done.error_code == "PROVIDER_REJECTED"
    assert done.error_message == "remote answered 422: injected"
    assert remote_ids(remote_api, remote_tenant) == {old["id"]}
    assert len(proxy.calls("POST", "/v1/webhooks")) == 1  # refused, not retried
