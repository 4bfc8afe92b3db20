"""The safe-migrate and operations API (docs/api.md, "Safe migrate", "Operations"), no worker.

Nothing consumes the ``operation.advance`` messages these requests publish; where a test needs
an operation further along, it runs the domain's steps itself.
"""

from __future__ import annotations

import base64
import json
import threading
import uuid
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from models import clock
from models import migration as migrations
from models.endpoint import WebhookEndpoint, signing_key
from models.idempotency import IdempotencyKey
from models.operation import Operation, OperationKind, Trigger
from tests.api.helpers import (
    SECRET_RE,
    assert_error,
    assert_request_id,
    assert_validation,
    create,
    parse_time,
    raw_rows,
)
from tests.contract import OPERATION_FIELDS, STEP_FIELDS
from tests.factories import Tenant, add_key, make_tenant
from tests.receivers import scripted_receiver
from tests.support import overridden
from workers.operations import advance

MISSING_ID = "0190a1b2-0000-7000-8000-000000000000"
STEP_NAMES = ["create_endpoint", "send_test_delivery", "await_success", "delete_old_endpoint"]


@pytest.fixture
def tenant(database) -> Tenant:
    return make_tenant(database)


@pytest.fixture
def source(client, tenant) -> dict[str, Any]:
    """An endpoint to migrate, created through the API."""
    return create(client, tenant)


def migrate(client, tenant: Tenant, endpoint_id: str, body: Any = None, **headers: str):
    kwargs: dict[str, Any] = {"headers": {**tenant.headers, **headers}}
    if body is not None:
        kwargs["json"] = body
    return client.post(f"/v1/webhooks/{endpoint_id}/migrate", **kwargs)


def started(client, tenant: Tenant, endpoint_id: str, body: Any = None) -> dict[str, Any]:
    response = migrate(client, tenant, endpoint_id, body)
    assert response.status_code == 202, response.text
    result: dict[str, Any] = response.json()
    return result


def operation_count(database) -> int:
    with database.session() as session:
        return session.scalar(select(func.count()).select_from(Operation))


def endpoint_count(database) -> int:
    with database.session() as session:
        return session.scalar(select(func.count()).select_from(WebhookEndpoint))


def run_step(database, operation_id: str) -> None:
    """One domain step (no HTTP): enough to create the new endpoint or roll back."""
    with database.session() as session:
        migrations.begin_advance(session, uuid.UUID(operation_id))


def get_operation(client, tenant: Tenant, operation_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/operations/{operation_id}", headers=tenant.headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def list_ids(client, tenant: Tenant, **params: Any) -> list[str]:
    response = client.get("/v1/operations", params=params, headers=tenant.headers)
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["data"]]


def sse_frames(text: str) -> list[dict[str, str]]:
    frames = []
    for block in text.strip().split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line and not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
        if fields:
            frames.append(fields)
    return frames


# --- migrate: the 202 ---------------------------------------------------------------------------


def test_migrate_answers_202_with_the_operation_and_the_secret_once(client, tenant, source):
    response = migrate(client, tenant, source["id"])
    assert response.status_code == 202, response.text
    assert_request_id(response)
    body = response.json()
    assert set(body) == OPERATION_FIELDS | {"secret", "secret_displayed_once"}
    assert body["secret_displayed_once"] is True
    assert SECRET_RE.match(body["secret"]), body["secret"]
    assert len(base64.b64decode(body["secret"], validate=True)) == 32
    assert body["secret"] != source["secret"]
    uuid.UUID(body["id"])
    assert body["org_id"] == str(tenant.org_id)
    assert body["kind"] == "safe_migrate"
    assert body["state"] == "pending"
    assert body["trigger"] == "api"
    assert body["policy_id"] is None
    assert body["source_endpoint_id"] == source["id"]
    assert body["new_endpoint_id"] is None
    assert body["error"] is None
    assert body["finished_at"] is None
    assert [step["name"] for step in body["steps"]] == STEP_NAMES
    for step in body["steps"]:
        assert set(step) == STEP_FIELDS
        assert step["state"] == "pending"
        assert step["attempts"] == 0
        assert step["started_at"] is step["finished_at"] is step["next_attempt_at"] is None
        assert step["last_error"] is None
    created_at = parse_time(body["created_at"])
    assert parse_time(body["updated_at"]) == created_at
    assert parse_time(body["deadline_at"]) - created_at == timedelta(seconds=900)

    # GET shows the same operation, never the secret.
    fetched = client.get(f"/v1/operations/{body['id']}", headers=tenant.headers)
    assert fetched.status_code == 200
    assert fetched.json() == {
        k: v for k, v in body.items() if k not in ("secret", "secret_displayed_once")
    }
    assert body["secret"] not in fetched.text


def test_migrate_body_is_optional_and_copies_the_source(client, database, tenant):
    source = create(client, tenant, description="copy me")
    for response in (
        migrate(client, tenant, source["id"]),  # no body at all
        client.post(
            f"/v1/webhooks/{create(client, tenant)['id']}/migrate",
            content=b"",
            headers={**tenant.headers, "Content-Type": "application/json"},
        ),
        migrate(client, tenant, create(client, tenant)["id"], {}),
    ):
        assert response.status_code == 202, response.text
    operation_id = client.get("/v1/operations", headers=tenant.headers).json()["data"][-1]["id"]
    run_step(database, operation_id)
    new_id = get_operation(client, tenant, operation_id)["new_endpoint_id"]
    new = client.get(f"/v1/webhooks/{new_id}", headers=tenant.headers).json()
    assert (new["url"], new["events"], new["description"]) == (
        source["url"],
        source["events"],
        "copy me",
    )


def test_migrate_body_sets_the_new_endpoint_and_the_deadline(client, database, tenant, source):
    body = started(
        client,
        tenant,
        source["id"],
        {
            "url": "https://new.example.com/hooks",
            "events": ["campaign.approved"],
            "description": "moved",
            "deadline_seconds": 60,
        },
    )
    assert parse_time(body["deadline_at"]) - parse_time(body["created_at"]) == timedelta(seconds=60)
    run_step(database, body["id"])
    new_id = get_operation(client, tenant, body["id"])["new_endpoint_id"]
    new = client.get(f"/v1/webhooks/{new_id}", headers=tenant.headers).json()
    assert (new["url"], new["events"], new["description"]) == (
        "https://new.example.com/hooks",
        ["campaign.approved"],
        "moved",
    )
    with database.session() as session:
        row = session.get(WebhookEndpoint, uuid.UUID(new_id))
        assert row is not None
        assert signing_key(session, row) == base64.b64decode(body["secret"])


INVALID_BODIES: list[tuple[Any, str]] = [
    ({"deadline_seconds": 59}, "deadline_seconds"),
    ({"deadline_seconds": 86_401}, "deadline_seconds"),
    ({"deadline_seconds": 0}, "deadline_seconds"),
    ({"deadline_seconds": "900"}, "deadline_seconds"),
    ({"deadline_seconds": 90.5}, "deadline_seconds"),
    ({"deadline_seconds": None}, "deadline_seconds"),
    ({"colour": "blue"}, "colour"),
    ({"url": "ftp://hooks.example.com/x"}, "url"),
    ({"url": "http://hooks.example.com/x"}, "url"),
    ({"url": "not a url"}, "url"),
    ({"url": ""}, "url"),
    ({"events": []}, "events"),
    ({"events": ["no.such_event"]}, "events"),
    ({"events": ["webhook.test"]}, "events"),
    ({"events": ["brand.vetted", "brand.vetted"]}, "events"),
    ({"events": "brand.vetted"}, "events"),
    ({"description": "x" * 201}, "description"),
    (b"{", "body"),
    (b"[]", "body"),
    (b"null", "body"),
    (b'"x"', "body"),
]


def test_invalid_migrate_body_is_422_and_creates_nothing(client, database, tenant, source):
    for body, field in INVALID_BODIES:
        if isinstance(body, bytes):
            response = client.post(
                f"/v1/webhooks/{source['id']}/migrate",
                content=body,
                headers={**tenant.headers, "Content-Type": "application/json"},
            )
        else:
            response = migrate(client, tenant, source["id"], body)
        assert response.status_code == 422, (body, response.text)
        details = assert_validation(response)
        assert field in details, (body, details)
    assert operation_count(database) == 0
    assert endpoint_count(database) == 1
    assert migrate(client, tenant, source["id"]).status_code == 202  # nothing left it busy


def test_migrate_accepts_the_deadline_bounds(client, tenant):
    for seconds in (60, 86_400):
        body = started(client, tenant, create(client, tenant)["id"], {"deadline_seconds": seconds})
        assert parse_time(body["deadline_at"]) - parse_time(body["created_at"]) == timedelta(
            seconds=seconds
        )


# --- 404 and scopes -----------------------------------------------------------------------------


def test_migrate_of_an_unknown_foreign_or_deleted_endpoint_is_404(client, database, tenant):
    other = make_tenant(database, name="Other")
    foreign = create(client, other)
    deleted = create(client, tenant)
    assert client.delete(f"/v1/webhooks/{deleted['id']}", headers=tenant.headers).status_code == 204
    for endpoint_id in (foreign["id"], deleted["id"], MISSING_ID):
        assert_error(migrate(client, tenant, endpoint_id), 404, "NOT_FOUND", "not found")
    assert operation_count(database) == 0
    # Validation does not reveal another organization's endpoint either.
    assert_error(
        migrate(client, tenant, foreign["id"], {"deadline_seconds": 900}), 404, "NOT_FOUND"
    )


def test_another_organizations_operation_is_404_everywhere(client, database, tenant, source):
    operation = started(client, tenant, source["id"])
    other = make_tenant(database, name="Other")
    path = f"/v1/operations/{operation['id']}"
    for method, url in (
        ("GET", path),
        ("GET", f"{path}/events"),
        ("POST", f"{path}/cancel"),
        ("POST", f"{path}/reveal-secret"),
    ):
        assert_error(client.request(method, url, headers=other.headers), 404, "NOT_FOUND")
        missing = url.replace(operation["id"], MISSING_ID)
        assert_error(client.request(method, missing, headers=tenant.headers), 404, "NOT_FOUND")
    assert list_ids(client, other) == []
    assert get_operation(client, tenant, operation["id"])["state"] == "pending"


def test_each_route_needs_its_scope(client, database, tenant):
    pending = started(client, tenant, create(client, tenant)["id"])["id"]
    with database.session() as session:
        unrevealed = migrations.start_migration(
            session,
            tenant.org_id,
            uuid.UUID(create(client, tenant)["id"]),
            kind=OperationKind.SCHEDULED_ROTATION,
            trigger=Trigger.SCHEDULE,
            reveal=False,
        ).operation.id
    ended = started(client, tenant, create(client, tenant)["id"])["id"]  # its stream ends at once
    client.post(f"/v1/operations/{ended}/cancel", headers=tenant.headers)
    run_step(database, ended)
    free = create(client, tenant)["id"]
    scopes = ("webhooks:read", "webhooks:write", "org:admin:write", "events:write")
    for method, url, scope in [
        ("GET", "/v1/operations", "webhooks:read"),
        ("GET", f"/v1/operations/{pending}", "webhooks:read"),
        ("GET", f"/v1/operations/{ended}/events", "webhooks:read"),
        ("POST", f"/v1/operations/{pending}/cancel", "webhooks:write"),
        ("POST", f"/v1/operations/{unrevealed}/reveal-secret", "webhooks:write"),
        ("POST", f"/v1/webhooks/{free}/migrate", "webhooks:write"),
    ]:
        others = add_key(database, tenant, [other for other in scopes if other != scope])
        denied = client.request(method, url, headers=others.headers)
        assert denied.status_code == 403, (url, denied.text)
        assert_error(denied, 403, "FORBIDDEN", "missing required scope")
        allowed = client.request(method, url, headers=add_key(database, tenant, [scope]).headers)
        assert allowed.status_code in (200, 202), (url, allowed.text)


def test_reveal_and_cancel_of_an_org_secret_rotation_need_org_admin_write(client, database, tenant):
    """An org secret rotation hands out the organization's secret: org:admin:write, not
    webhooks:write. Other kinds keep webhooks:write. 404 comes before 403, whatever the scopes,
    so another organization's id says nothing."""
    endpoint_id = uuid.UUID(create(client, tenant)["id"])
    with database.session() as session:
        pending = migrations.start_rotation(
            session, tenant.org_id, None, policy_id=None, scheduled_for=None
        ).id
        done = migrations.start_rotation(
            session, tenant.org_id, None, policy_id=None, scheduled_for=None
        ).id
        endpoint_rotation = migrations.start_rotation(
            session,
            tenant.org_id,
            endpoint_id,
            policy_id=None,
            scheduled_for=None,
        ).id
    run_step(database, str(done))
    run_step(database, str(endpoint_rotation))
    webhooks_writer = add_key(database, tenant, ["webhooks:read", "webhooks:write", "events:write"])
    admin = add_key(database, tenant, ["org:admin:write"])
    reader = add_key(database, tenant, ["webhooks:read"])

    def post(operation_id: uuid.UUID | str, action: str, who: Tenant):
        return client.post(f"/v1/operations/{operation_id}/{action}", headers=who.headers)

    other = make_tenant(database, name="Other")
    for scopes in ([], ["webhooks:read"], ["webhooks:write"], ["org:admin:write"]):
        outsider = add_key(database, other, scopes) if scopes else other
        for operation_id in (pending, done, endpoint_rotation):
            for action in ("cancel", "reveal-secret"):
                assert_error(post(operation_id, action, outsider), 404, "NOT_FOUND", "not found")
    for who in (webhooks_writer, admin, reader):
        for action in ("cancel", "reveal-secret"):
            assert_error(post(MISSING_ID, action, who), 404, "NOT_FOUND")
    assert client.post(f"/v1/operations/{done}/reveal-secret").status_code == 401

    for who in (webhooks_writer, reader):
        for operation_id, action in ((pending, "cancel"), (done, "reveal-secret")):
            assert_error(
                post(operation_id, action, who), 403, "FORBIDDEN", "missing required scope"
            )
    assert get_operation(client, tenant, str(pending))["state"] == "pending"  # not canceled
    revealed = post(done, "reveal-secret", admin)  # the refusals did not use the reveal up
    assert revealed.status_code == 200, revealed.text
    assert SECRET_RE.match(revealed.json()["secret"])
    canceled = post(pending, "cancel", admin)
    assert canceled.status_code == 202, canceled.text

    # An endpoint's rotation is still webhooks:write's, and org:admin:write alone is not enough.
    assert_error(post(endpoint_rotation, "reveal-secret", admin), 403, "FORBIDDEN")
    assert post(endpoint_rotation, "reveal-secret", webhooks_writer).status_code == 200


# --- Idempotency-Key ----------------------------------------------------------------------------


def test_same_key_and_body_return_the_first_response_again(client, database, tenant, source):
    body = {"deadline_seconds": 600}
    first = migrate(client, tenant, source["id"], body, **{"Idempotency-Key": "k-1"})
    assert first.status_code == 202, first.text
    run_step(database, first.json()["id"])  # the operation moves on meanwhile
    again = migrate(client, tenant, source["id"], body, **{"Idempotency-Key": "k-1"})
    assert again.status_code == 202, again.text
    assert again.json() == first.json()  # the same operation, as first answered, secret included
    assert operation_count(database) == 1
    assert endpoint_count(database) == 2  # the source and the one new endpoint


def test_same_key_with_another_body_is_422(client, database, tenant, source):
    key = {"Idempotency-Key": "k-2"}
    assert (
        migrate(client, tenant, source["id"], {"deadline_seconds": 600}, **key).status_code == 202
    )
    for other_body in ({"deadline_seconds": 601}, None, {"description": "x"}):
        details = assert_validation(migrate(client, tenant, source["id"], other_body, **key))
        assert "Idempotency-Key" in details
    # The same key on another endpoint is another request too.
    details = assert_validation(
        migrate(client, tenant, create(client, tenant)["id"], {"deadline_seconds": 600}, **key)
    )
    assert "Idempotency-Key" in details
    assert operation_count(database) == 1


def test_idempotency_keys_are_per_organization(client, database, tenant, source):
    other = make_tenant(database, name="Other")
    theirs = create(client, other)
    mine = migrate(client, tenant, source["id"], **{"Idempotency-Key": "shared"})
    their = migrate(client, other, theirs["id"], **{"Idempotency-Key": "shared"})
    assert mine.status_code == their.status_code == 202
    assert mine.json()["id"] != their.json()["id"]
    assert operation_count(database) == 2


def test_a_stored_response_replays_only_to_the_api_key_that_made_it(
    client, database, tenant, source
):
    """The first response holds a secret shown once: another API key of the organization
    sending the same Idempotency-Key gets 422, never that body."""
    key = {"Idempotency-Key": "mine"}
    body = {"deadline_seconds": 600}
    first = migrate(client, tenant, source["id"], body, **key)
    assert first.status_code == 202, first.text
    colleague = add_key(database, tenant, ["webhooks:read", "webhooks:write"])
    for other_body in (body, {"deadline_seconds": 601}):
        refused = migrate(client, colleague, source["id"], other_body, **key)
        details = assert_validation(refused, "Idempotency-Key")
        assert "another API key" in details["Idempotency-Key"]
        assert first.json()["secret"] not in refused.text
    assert operation_count(database) == 1
    assert migrate(client, tenant, source["id"], body, **key).json() == first.json()
    # The row stays bound to the key that made it.
    (row,) = raw_rows(database, "idempotency_keys")
    assert uuid.UUID(str(row["api_key_id"])) == tenant.key_id


def test_another_api_key_gets_no_stored_response_after_the_migration_finished(
    client, database, tenant, settings
):
    with overridden(settings, allow_insecure_urls=True), scripted_receiver(200) as receiver:
        source = create(client, tenant, url=receiver.url)
        key = {"Idempotency-Key": "finished"}
        first = migrate(client, tenant, source["id"], **key)
        assert first.status_code == 202, first.text
        operation_id = uuid.UUID(first.json()["id"])
        for _ in range(3):
            advance(database, operation_id)
        assert get_operation(client, tenant, str(operation_id))["state"] == "succeeded"
    colleague = add_key(database, tenant, ["webhooks:write"])
    refused = migrate(client, colleague, source["id"], **key)
    assert "Idempotency-Key" in assert_validation(refused)
    assert first.json()["secret"] not in refused.text
    assert migrate(client, tenant, source["id"], **key).json() == first.json()


def test_a_response_stored_before_keys_were_bound_replays_to_no_key(
    client, database, tenant, source
):
    """Rows from before migration 0009 name no API key: refused to every key until they expire."""
    key = {"Idempotency-Key": "legacy"}
    first = migrate(client, tenant, source["id"], **key)
    assert first.status_code == 202, first.text
    with database.session() as session:
        session.execute(update(IdempotencyKey).values(api_key_id=None))
    refused = migrate(client, tenant, source["id"], **key)
    assert "Idempotency-Key" in assert_validation(refused)
    assert first.json()["secret"] not in refused.text


def test_bad_idempotency_key_is_422(client, database, tenant, source):
    for key in ("k" * 256, "", "tab\there"):
        response = migrate(client, tenant, source["id"], **{"Idempotency-Key": key})
        details = assert_validation(response)
        assert "Idempotency-Key" in details, (key, details)
    assert operation_count(database) == 0


def test_longest_idempotency_key_is_accepted(client, database, tenant, source):
    key = {"Idempotency-Key": "k" * 255}
    first = migrate(client, tenant, source["id"], **key)
    assert first.status_code == 202, first.text
    assert migrate(client, tenant, source["id"], **key).json() == first.json()


def test_different_keys_on_a_busy_endpoint_are_409(client, database, tenant, source):
    assert migrate(client, tenant, source["id"], **{"Idempotency-Key": "a"}).status_code == 202
    response = migrate(client, tenant, source["id"], **{"Idempotency-Key": "b"})
    assert_error(response, 409, "CONFLICT")
    assert operation_count(database) == 1
    # The refused key was not used up: once the endpoint is free it starts a migration.
    (operation_id,) = list_ids(client, tenant)
    client.post(f"/v1/operations/{operation_id}/cancel", headers=tenant.headers)
    run_step(database, operation_id)
    retried = migrate(client, tenant, source["id"], **{"Idempotency-Key": "b"})
    assert retried.status_code == 202, retried.text
    assert retried.json()["id"] != operation_id


def test_same_key_after_the_migration_finished_returns_the_first_response(
    client, database, tenant, settings
):
    """A client retrying after its first response was lost gets that response, secret included,
    even when the migration has already deleted the endpoint it named."""
    with overridden(settings, allow_insecure_urls=True), scripted_receiver(200) as receiver:
        source = create(client, tenant, url=receiver.url)
        key = {"Idempotency-Key": "retry-me"}
        first = migrate(client, tenant, source["id"], **key)
        assert first.status_code == 202, first.text
        operation_id = uuid.UUID(first.json()["id"])
        for _ in range(3):
            advance(database, operation_id)
        assert get_operation(client, tenant, str(operation_id))["state"] == "succeeded"
        again = migrate(client, tenant, source["id"], **key)
        other_body = migrate(client, tenant, source["id"], {"deadline_seconds": 60}, **key)
        unkeyed = migrate(client, tenant, source["id"])
    assert again.status_code == 202, again.text
    assert again.json() == first.json()
    # Without the same key and body, the endpoint is simply gone.
    assert_error(other_body, 404, "NOT_FOUND")
    assert_error(unkeyed, 404, "NOT_FOUND")
    assert operation_count(database) == 1


# --- one migration per endpoint -----------------------------------------------------------------


def _race(app, tenant: Tenant, endpoint_id: str, headers: dict[str, str]) -> list[Any]:
    """Eight clients post the same migrate at once; returns their responses."""
    barrier = threading.Barrier(8)
    results: list[Any] = [None] * 8

    def post(index: int) -> None:
        with TestClient(app, raise_server_exceptions=False) as own:
            barrier.wait(timeout=10)
            try:
                results[index] = own.post(
                    f"/v1/webhooks/{endpoint_id}/migrate", headers={**tenant.headers, **headers}
                )
            except Exception as exc:
                results[index] = exc

    threads = [threading.Thread(target=post, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_concurrent_migrates_of_one_endpoint_start_exactly_one(
    app, client, database, tenant, source
):
    responses = _race(app, tenant, source["id"], {})
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [202] + [409] * 7, [getattr(r, "text", r) for r in responses]
    for response in responses:
        if response.status_code == 409:
            assert_error(response, 409, "CONFLICT")
    assert operation_count(database) == 1


def test_concurrent_migrates_with_one_key_all_get_the_one_operation(
    app, client, database, tenant, source
):
    responses = _race(app, tenant, source["id"], {"Idempotency-Key": "together"})
    assert [response.status_code for response in responses] == [202] * 8
    assert len({json.dumps(response.json(), sort_keys=True) for response in responses}) == 1
    assert operation_count(database) == 1


def test_one_key_raced_on_different_endpoints_starts_one_migration(client, database, tenant):
    """The same key sent for eight endpoints at once: one request wins, the others are another
    request with that key (422), never a server error."""
    endpoints = [create(client, tenant)["id"] for _ in range(8)]
    barrier = threading.Barrier(8)
    results: list[Any] = [None] * 8
    app = client.app

    def post(index: int) -> None:
        with TestClient(app, raise_server_exceptions=False) as own:
            barrier.wait(timeout=10)
            results[index] = own.post(
                f"/v1/webhooks/{endpoints[index]}/migrate",
                headers={**tenant.headers, "Idempotency-Key": "one-key"},
            )

    threads = [threading.Thread(target=post, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    statuses = sorted(response.status_code for response in results)
    assert statuses == [202] + [422] * 7, [response.text for response in results]
    for response in results:
        if response.status_code == 422:
            assert "Idempotency-Key" in assert_validation(response)
    assert operation_count(database) == 1


def test_the_new_endpoint_of_a_running_migration_is_busy_too(client, database, tenant, source):
    operation = started(client, tenant, source["id"])
    run_step(database, operation["id"])
    new_id = get_operation(client, tenant, operation["id"])["new_endpoint_id"]
    assert new_id is not None
    for endpoint_id in (source["id"], new_id):
        assert_error(migrate(client, tenant, endpoint_id), 409, "CONFLICT")
        deleted = client.delete(f"/v1/webhooks/{endpoint_id}", headers=tenant.headers)
        assert_error(deleted, 409, "CONFLICT")
    assert operation_count(database) == 1


def test_a_running_migration_pins_the_secret_url_and_events_of_both_endpoints(
    client, database, tenant, source
):
    """rotate-secret, and a PATCH of url or events, on either endpoint of an unfinished
    migration are 409 CONFLICT naming the operation, as DELETE is; active and description
    may still change."""
    operation = started(client, tenant, source["id"])
    run_step(database, operation["id"])
    new_id = get_operation(client, tenant, operation["id"])["new_endpoint_id"]
    assert new_id is not None
    before = {row["id"]: row for row in raw_rows(database, "webhook_endpoints")}
    for endpoint_id, role in ((source["id"], "source"), (new_id, "new")):
        path = f"/v1/webhooks/{endpoint_id}"
        current = client.get(path, headers=tenant.headers).json()
        for method, url, body in [
            ("POST", f"{path}/rotate-secret", None),
            ("PATCH", path, {"url": "https://elsewhere.example.com/hooks"}),
            ("PATCH", path, {"events": ["campaign.approved"]}),
            ("PATCH", path, {"events": current["events"], "url": "https://x.example.com/h"}),
            ("DELETE", path, None),
            ("POST", f"/v1/webhooks/{endpoint_id}/migrate", None),
        ]:
            response = client.request(method, url, json=body, headers=tenant.headers)
            error = assert_error(response, 409, "CONFLICT")
            assert error["details"] == {
                "endpoint_id": f"{endpoint_id} is the {role} endpoint of unfinished operation "
                f"{operation['id']}"
            }, (method, url, body)
            assert "secret" not in response.json()
        # What the migration does not depend on may change, and so may nothing at all.
        for body in (
            {"active": False, "description": "paused during the move"},
            {"active": True},
            {"url": current["url"], "events": current["events"]},
        ):
            response = client.patch(path, json=body, headers=tenant.headers)
            assert response.status_code == 200, (body, response.text)
        shown = client.get(path, headers=tenant.headers).json()
        assert (shown["url"], shown["events"]) == (current["url"], current["events"])
        assert shown["description"] == "paused during the move"
    after = {row["id"]: row for row in raw_rows(database, "webhook_endpoints")}
    for row_id, row in after.items():
        assert row["secret_ciphertext"] == before[row_id]["secret_ciphertext"]
        assert row["deleted_at"] is None

    # Once the migration has ended, the endpoint it leaves is free again.
    client.post(f"/v1/operations/{operation['id']}/cancel", headers=tenant.headers)
    run_step(database, operation["id"])
    rotated = client.post(f"/v1/webhooks/{source['id']}/rotate-secret", headers=tenant.headers)
    assert rotated.status_code == 200, rotated.text
    moved = client.patch(
        f"/v1/webhooks/{source['id']}",
        json={"url": "https://elsewhere.example.com/hooks"},
        headers=tenant.headers,
    )
    assert moved.status_code == 200, moved.text


# --- listing ------------------------------------------------------------------------------------


def test_list_filters_by_state_kind_and_either_endpoint(client, database, tenant):
    first = create(client, tenant)
    second = create(client, tenant)
    third = create(client, tenant)
    running = started(client, tenant, first["id"])
    clock.travel(timedelta(seconds=1))
    canceled = started(client, tenant, second["id"])
    clock.travel(timedelta(seconds=1))
    with database.session() as session:
        scheduled = str(
            migrations.start_migration(
                session,
                tenant.org_id,
                uuid.UUID(third["id"]),
                kind=OperationKind.SCHEDULED_ROTATION,
                trigger=Trigger.SCHEDULE,
                reveal=False,
            ).operation.id
        )
    run_step(database, running["id"])
    assert (
        client.post(f"/v1/operations/{canceled['id']}/cancel", headers=tenant.headers).status_code
        == 202
    )
    run_step(database, canceled["id"])
    new_id = get_operation(client, tenant, running["id"])["new_endpoint_id"]
    other = make_tenant(database, name="Other")
    started(client, other, create(client, other)["id"])

    assert list_ids(client, tenant) == [scheduled, canceled["id"], running["id"]]
    assert list_ids(client, tenant, state="running") == [running["id"]]
    assert list_ids(client, tenant, state="canceled") == [canceled["id"]]
    assert list_ids(client, tenant, state="pending") == [scheduled]
    assert list_ids(client, tenant, state="succeeded") == []
    assert list_ids(client, tenant, kind="safe_migrate") == [canceled["id"], running["id"]]
    assert list_ids(client, tenant, kind="scheduled_rotation") == [scheduled]
    assert list_ids(client, tenant, kind="org_secret_rotation") == []
    assert list_ids(client, tenant, endpoint_id=first["id"]) == [running["id"]]
    assert list_ids(client, tenant, endpoint_id=new_id) == [running["id"]]
    assert list_ids(client, tenant, endpoint_id=third["id"]) == [scheduled]
    assert list_ids(client, tenant, endpoint_id=MISSING_ID) == []
    assert list_ids(client, tenant, kind="safe_migrate", state="canceled") == [canceled["id"]]
    listed = client.get("/v1/operations", headers=tenant.headers).json()
    assert listed["success"] is True
    assert all(set(item) == OPERATION_FIELDS for item in listed["data"])
    assert all("secret" not in json.dumps(item) for item in listed["data"])


def test_invalid_list_query_is_422(client, tenant):
    for params, field in [
        ({"state": "done"}, "state"),
        ({"state": ""}, "state"),
        ({"kind": "migrate"}, "kind"),
        ({"endpoint_id": "nope"}, "endpoint_id"),
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"cursor": "garbage!"}, "cursor"),
    ]:
        response = client.get("/v1/operations", params=params, headers=tenant.headers)
        details = assert_validation(response)
        assert field in details, (params, details)


def test_list_pages_newest_first_with_a_cursor(client, tenant):
    made = []
    for _ in range(5):
        made.append(started(client, tenant, create(client, tenant)["id"])["id"])
        clock.travel(timedelta(milliseconds=5))
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/operations", params=params, headers=tenant.headers).json()
        pages += 1
        assert page["meta"]["limit"] == 2
        assert len(page["data"]) <= 2
        seen += [item["id"] for item in page["data"]]
        cursor = page["meta"]["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == list(reversed(made))


# --- reveal-secret and where the secret never shows -----------------------------------------------


def test_reveal_for_an_api_started_migrate_is_409(client, tenant, source):
    operation = started(client, tenant, source["id"])
    response = client.post(
        f"/v1/operations/{operation['id']}/reveal-secret", headers=tenant.headers
    )
    assert_error(response, 409, "CONFLICT")
    assert operation["secret"] not in response.text


def test_reveal_hands_out_a_scheduled_operations_secret_once(client, database, tenant, source):
    with database.session() as session:
        begun = migrations.start_migration(
            session,
            tenant.org_id,
            uuid.UUID(source["id"]),
            kind=OperationKind.SCHEDULED_ROTATION,
            trigger=Trigger.SCHEDULE,
            reveal=False,
        )
    assert begun.secret is None
    operation_id = str(begun.operation.id)
    path = f"/v1/operations/{operation_id}/reveal-secret"
    revealed = client.post(path, headers=tenant.headers)
    assert revealed.status_code == 200, revealed.text
    body = revealed.json()
    assert body == {
        "operation_id": operation_id,
        "new_endpoint_id": None,
        "secret": body["secret"],
        "secret_displayed_once": True,
    }
    assert SECRET_RE.match(body["secret"])
    assert_error(client.post(path, headers=tenant.headers), 409, "CONFLICT")
    # It is the secret the new endpoint signs with.
    run_step(database, operation_id)
    fetched = get_operation(client, tenant, operation_id)
    assert fetched["kind"] == "scheduled_rotation"
    assert fetched["trigger"] == "schedule"
    with database.session() as session:
        new = session.get(WebhookEndpoint, uuid.UUID(fetched["new_endpoint_id"]))
        assert new is not None
        assert signing_key(session, new) == base64.b64decode(body["secret"])
    assert_error(client.post(path, headers=tenant.headers), 409, "CONFLICT")


def test_the_secret_never_appears_in_reads_or_the_raw_row(client, database, tenant, source):
    operation = started(client, tenant, source["id"], {"deadline_seconds": 120})
    secret = operation["secret"]
    raw = base64.b64decode(secret)
    run_step(database, operation["id"])
    reads = [
        client.get(f"/v1/operations/{operation['id']}", headers=tenant.headers),
        client.get("/v1/operations", headers=tenant.headers),
        client.get(f"/v1/webhooks/{source['id']}", headers=tenant.headers),
        client.get("/v1/webhooks", headers=tenant.headers),
    ]
    for response in reads:
        assert response.status_code == 200, response.text
        assert secret not in response.text
        assert '"secret"' not in response.text
    for table in ("operations", "operation_steps", "idempotency_keys", "webhook_endpoints"):
        for row in raw_rows(database, table):
            for value in row.values():
                if isinstance(value, bytes):
                    assert raw not in value
                    assert secret.encode() not in value
                else:
                    assert secret not in str(value)
    (row,) = raw_rows(database, "operations")
    assert row["new_secret_ciphertext"]  # kept, sealed, for the worker


def test_events_of_an_ended_operation_is_one_frame_then_the_end(client, database, tenant, source):
    operation = started(client, tenant, source["id"])
    client.post(f"/v1/operations/{operation['id']}/cancel", headers=tenant.headers)
    run_step(database, operation["id"])
    with client.stream(
        "GET", f"/v1/operations/{operation['id']}/events", headers=tenant.headers
    ) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        text = "".join(stream.iter_text())
    (frame,) = sse_frames(text)
    assert frame["event"] == "operation"
    data = json.loads(frame["data"])
    assert data == get_operation(client, tenant, operation["id"])
    assert data["state"] == "canceled"
    assert operation["secret"] not in text


# --- cancel -------------------------------------------------------------------------------------


def test_cancel_answers_202_then_409_once_ended(client, database, tenant, source):
    operation = started(client, tenant, source["id"])
    path = f"/v1/operations/{operation['id']}/cancel"
    accepted = client.post(path, headers=tenant.headers)
    assert accepted.status_code == 202, accepted.text
    assert set(accepted.json()) == OPERATION_FIELDS
    assert accepted.json()["id"] == operation["id"]
    again = client.post(path, headers=tenant.headers)  # not ended yet: asking twice is fine
    assert again.status_code == 202, again.text
    run_step(database, operation["id"])
    ended = get_operation(client, tenant, operation["id"])
    assert ended["state"] == "canceled"
    assert ended["finished_at"] is not None
    assert_error(client.post(path, headers=tenant.headers), 409, "CONFLICT")
    # The endpoint is free again.
    assert migrate(client, tenant, source["id"]).status_code == 202
