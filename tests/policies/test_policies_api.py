"""/v1/rotation-policies: shapes, validation, one per target, scopes, tenancy (docs/api.md)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from models import clock
from tests.api.helpers import assert_error, assert_request_id, assert_validation, create, parse_time
from tests.factories import Tenant, add_key, make_tenant
from tests.support import overridden

POLICY_FIELDS = {
    "id",
    "target",
    "endpoint_id",
    "strategy",
    "interval_seconds",
    "paused",
    "handoff",
    "next_run_at",
    "last_run_at",
    "last_operation_id",
    "max_concurrency",
    "provider_id",
    "remote_endpoint_id",
}
MISSING_ID = "0190a1b2-0000-7000-8000-000000000000"
DAY_S = 86_400


@pytest.fixture
def tenant(database) -> Tenant:
    return make_tenant(database)


@pytest.fixture
def other(database) -> Tenant:
    return make_tenant(database, name="Other Co")


@pytest.fixture
def endpoint(client, tenant) -> dict[str, Any]:
    return create(client, tenant)


# --- helpers ------------------------------------------------------------------------------------


def assert_policy(body: dict[str, Any]) -> None:
    assert set(body) == POLICY_FIELDS, body
    assert uuid.UUID(body["id"]).version == 7
    assert str(uuid.UUID(body["id"])) == body["id"]
    assert body["target"] in ("endpoint", "org_secret")
    assert body["strategy"] in ("safe_migrate", "rotate")
    assert body["handoff"] in ("none", "in_band")
    assert isinstance(body["interval_seconds"], int)
    assert body["interval_seconds"] >= 1
    assert isinstance(body["paused"], bool)
    parse_time(body["next_run_at"])
    if body["last_run_at"] is not None:
        parse_time(body["last_run_at"])
    if body["target"] == "endpoint":
        assert str(uuid.UUID(body["endpoint_id"])) == body["endpoint_id"]
    else:
        assert body["endpoint_id"] is None


def post_policy(client, tenant: Tenant, **body: Any):
    return client.post("/v1/rotation-policies", json=body, headers=tenant.headers)


def make_policy(client, tenant: Tenant, **body: Any) -> dict[str, Any]:
    response = post_policy(client, tenant, **body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    assert_policy(created)
    return created


def endpoint_policy(client, tenant: Tenant, endpoint_id: str, **body: Any) -> dict[str, Any]:
    return make_policy(
        client,
        tenant,
        **{"target": "endpoint", "endpoint_id": endpoint_id, "interval_seconds": DAY_S, **body},
    )


def get_policy(client, tenant: Tenant, policy_id: str):
    return client.get(f"/v1/rotation-policies/{policy_id}", headers=tenant.headers)


def listed_ids(client, tenant: Tenant) -> list[str]:
    response = client.get("/v1/rotation-policies", headers=tenant.headers)
    assert response.status_code == 200, response.text
    return [policy["id"] for policy in response.json()["data"]]


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


# --- create and read ----------------------------------------------------------------------------


def test_create_an_endpoint_policy_with_defaults(client, tenant, endpoint):
    before = clock.now()
    response = post_policy(
        client, tenant, target="endpoint", endpoint_id=endpoint["id"], interval_seconds=3600
    )
    after = clock.now()

    assert response.status_code == 201, response.text
    assert_request_id(response)
    body = response.json()
    assert_policy(body)
    assert body["target"] == "endpoint"
    assert body["endpoint_id"] == endpoint["id"]
    assert body["strategy"] == "safe_migrate"
    assert body["interval_seconds"] == 3600
    assert body["paused"] is False
    assert body["handoff"] == "none"
    assert body["last_run_at"] is None
    assert body["last_operation_id"] is None
    # The first run is one interval from now.
    next_run = parse_time(body["next_run_at"])
    slack = timedelta(milliseconds=1)
    assert before + timedelta(hours=1) - slack <= next_run <= after + timedelta(hours=1) + slack
    assert "success" not in body
    assert "data" not in body

    fetched = get_policy(client, tenant, body["id"])
    assert fetched.status_code == 200
    assert fetched.json() == body


def test_create_an_endpoint_policy_with_every_field(client, tenant, endpoint):
    first = clock.now().replace(microsecond=0) + timedelta(minutes=5)
    body = endpoint_policy(
        client,
        tenant,
        endpoint["id"],
        strategy="safe_migrate",
        interval_seconds=7 * DAY_S,
        paused=True,
        handoff="in_band",
        next_run_at=iso(first),
    )
    assert body["strategy"] == "safe_migrate"
    assert body["interval_seconds"] == 7 * DAY_S
    assert body["paused"] is True
    assert body["handoff"] == "in_band"
    assert parse_time(body["next_run_at"]) == first
    assert body["next_run_at"].endswith(".000Z")


def test_next_run_at_with_another_offset_is_returned_in_utc(client, tenant, endpoint):
    body = endpoint_policy(client, tenant, endpoint["id"], next_run_at="2031-05-06T09:30:00+02:00")
    assert body["next_run_at"] == "2031-05-06T07:30:00.000Z"


def test_create_a_rotate_policy(client, tenant, endpoint):
    body = endpoint_policy(client, tenant, endpoint["id"], strategy="rotate")
    assert body["strategy"] == "rotate"
    assert body["handoff"] == "none"


def test_create_an_org_secret_policy(client, tenant, other):
    body = make_policy(client, tenant, target="org_secret", interval_seconds=30 * DAY_S)
    assert body["target"] == "org_secret"
    assert body["endpoint_id"] is None
    assert body["strategy"] == "rotate"  # the only strategy an org secret has
    assert body["handoff"] == "none"
    assert get_policy(client, tenant, body["id"]).json() == body
    # Spelled out in full (another organization: one org_secret policy each).
    explicit = make_policy(
        client,
        other,
        target="org_secret",
        endpoint_id=None,
        strategy="rotate",
        handoff="none",
        interval_seconds=60,
    )
    assert explicit["strategy"] == "rotate"
    assert explicit["endpoint_id"] is None
    assert explicit["interval_seconds"] == 60


# --- validation on create -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"interval_seconds": 59}, "interval_seconds"),
        ({"interval_seconds": 0}, "interval_seconds"),
        ({"interval_seconds": -3600}, "interval_seconds"),
        ({"interval_seconds": "3600"}, "interval_seconds"),
        ({"interval_seconds": 3600.5}, "interval_seconds"),
        ({"interval_seconds": True}, "interval_seconds"),
        ({"interval_seconds": None}, "interval_seconds"),
        ({"interval_seconds": 10**12}, "interval_seconds"),
        ({"target": "webhook"}, "target"),
        ({"target": None}, "target"),
        ({"strategy": "yolo"}, "strategy"),
        ({"handoff": "smoke_signal"}, "handoff"),
        ({"handoff": "in_band", "strategy": "rotate"}, "handoff"),
        ({"endpoint_id": None}, "endpoint_id"),
        ({"endpoint_id": MISSING_ID}, "endpoint_id"),
        ({"endpoint_id": "not-a-uuid"}, "endpoint_id"),
        ({"paused": "yes"}, "paused"),
        ({"next_run_at": "tomorrow"}, "next_run_at"),
        ({"next_run_at": "2031-05-06T09:30:00"}, "next_run_at"),  # no offset
        ({"secret": "A" * 43 + "="}, "secret"),
        ({"org_id": MISSING_ID}, "org_id"),
        ({"last_run_at": "2031-05-06T09:30:00Z"}, "last_run_at"),
        ({"id": MISSING_ID}, "id"),
    ],
    ids=lambda value: str(value),
)
def test_invalid_endpoint_policies_are_refused(client, tenant, endpoint, changes, field):
    body = {"target": "endpoint", "endpoint_id": endpoint["id"], "interval_seconds": DAY_S}
    body.update(changes)
    response = client.post("/v1/rotation-policies", json=body, headers=tenant.headers)
    details = assert_validation(response)
    assert field in details, details
    assert listed_ids(client, tenant) == []


@pytest.mark.parametrize("missing", ["target", "interval_seconds"])
def test_required_fields(client, tenant, endpoint, missing):
    body = {"target": "endpoint", "endpoint_id": endpoint["id"], "interval_seconds": DAY_S}
    del body[missing]
    assert missing in assert_validation(post_policy(client, tenant, **body))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"endpoint_id": "ENDPOINT"}, "endpoint_id"),
        ({"strategy": "safe_migrate"}, "strategy"),
        ({"handoff": "in_band"}, "handoff"),
        ({"interval_seconds": 59}, "interval_seconds"),
    ],
    ids=["endpoint_id", "safe_migrate", "in_band", "interval"],
)
def test_invalid_org_secret_policies_are_refused(client, tenant, endpoint, changes, field):
    body = {"target": "org_secret", "interval_seconds": DAY_S, **changes}
    if body.get("endpoint_id") == "ENDPOINT":
        body["endpoint_id"] = endpoint["id"]
    details = assert_validation(post_policy(client, tenant, **body))
    assert field in details, details
    assert listed_ids(client, tenant) == []


def test_the_shortest_interval_is_sixty_seconds(client, tenant, endpoint):
    assert "interval_seconds" in assert_validation(
        post_policy(
            client, tenant, target="endpoint", endpoint_id=endpoint["id"], interval_seconds=59
        )
    )
    body = endpoint_policy(client, tenant, endpoint["id"], interval_seconds=60)
    assert body["interval_seconds"] == 60


def test_the_shortest_interval_is_a_setting(client, tenant, endpoint, settings):
    with overridden(settings, policy_min_interval_seconds=1):
        body = endpoint_policy(client, tenant, endpoint["id"], interval_seconds=1)
    assert body["interval_seconds"] == 1
    with overridden(settings, policy_min_interval_seconds=600):
        assert "interval_seconds" in assert_validation(
            post_policy(client, tenant, target="org_secret", interval_seconds=599)
        )


def test_an_endpoint_of_another_organization_is_refused(client, tenant, other):
    theirs = create(client, other)
    details = assert_validation(
        post_policy(
            client, tenant, target="endpoint", endpoint_id=theirs["id"], interval_seconds=DAY_S
        ),
        "endpoint_id",
    )
    assert "active endpoint" in details["endpoint_id"]
    assert listed_ids(client, tenant) == []
    assert listed_ids(client, other) == []


def test_a_deleted_endpoint_is_refused(client, tenant, endpoint):
    deleted = client.delete(f"/v1/webhooks/{endpoint['id']}", headers=tenant.headers)
    assert deleted.status_code == 204
    assert_validation(
        post_policy(
            client, tenant, target="endpoint", endpoint_id=endpoint["id"], interval_seconds=DAY_S
        ),
        "endpoint_id",
    )
    assert listed_ids(client, tenant) == []


def test_a_paused_endpoint_is_refused(client, tenant, endpoint):
    paused = client.patch(
        f"/v1/webhooks/{endpoint['id']}", json={"active": False}, headers=tenant.headers
    )
    assert paused.status_code == 200
    assert paused.json()["active"] is False
    assert_validation(
        post_policy(
            client, tenant, target="endpoint", endpoint_id=endpoint["id"], interval_seconds=DAY_S
        ),
        "endpoint_id",
    )
    # Active again: accepted.
    client.patch(f"/v1/webhooks/{endpoint['id']}", json={"active": True}, headers=tenant.headers)
    endpoint_policy(client, tenant, endpoint["id"])


def test_a_body_that_is_not_a_json_object_is_refused(client, tenant):
    for content in (b"", b"[]", b"{", b'"org_secret"'):
        response = client.post(
            "/v1/rotation-policies",
            content=content,
            headers={**tenant.headers, "Content-Type": "application/json"},
        )
        assert_validation(response, "body")
    assert listed_ids(client, tenant) == []


# --- one policy per target ----------------------------------------------------------------------


def test_one_policy_per_endpoint(client, tenant, endpoint):
    first = endpoint_policy(client, tenant, endpoint["id"])
    second = post_policy(
        client,
        tenant,
        target="endpoint",
        endpoint_id=endpoint["id"],
        strategy="rotate",
        interval_seconds=120,
    )
    assert_error(second, 409, "CONFLICT")
    assert listed_ids(client, tenant) == [first["id"]]
    # Another endpoint of the same organization has its own.
    another = create(client, tenant, url="https://hooks.example.com/another")
    endpoint_policy(client, tenant, another["id"])
    # Once the first policy is deleted, the endpoint can have a new one.
    assert (
        client.delete(f"/v1/rotation-policies/{first['id']}", headers=tenant.headers).status_code
        == 204
    )
    replacement = endpoint_policy(client, tenant, endpoint["id"], strategy="rotate")
    assert replacement["id"] != first["id"]


def test_one_org_secret_policy_per_organization(client, tenant, other):
    first = make_policy(client, tenant, target="org_secret", interval_seconds=DAY_S)
    second = post_policy(client, tenant, target="org_secret", interval_seconds=2 * DAY_S)
    assert_error(second, 409, "CONFLICT")
    assert listed_ids(client, tenant) == [first["id"]]
    # Another organization has its own.
    make_policy(client, other, target="org_secret", interval_seconds=DAY_S)
    # The org_secret policy and endpoint policies do not collide.
    endpoint = create(client, tenant)
    endpoint_policy(client, tenant, endpoint["id"])
    client.delete(f"/v1/rotation-policies/{first['id']}", headers=tenant.headers)
    make_policy(client, tenant, target="org_secret", interval_seconds=DAY_S)


# --- update -------------------------------------------------------------------------------------


def patch(client, tenant: Tenant, policy_id: str, body: Any):
    return client.patch(f"/v1/rotation-policies/{policy_id}", json=body, headers=tenant.headers)


def test_pause_and_resume(client, tenant, endpoint):
    policy = endpoint_policy(client, tenant, endpoint["id"])

    paused = patch(client, tenant, policy["id"], {"paused": True})
    assert paused.status_code == 200, paused.text
    assert_policy(paused.json())
    assert paused.json() == {**policy, "paused": True}
    assert get_policy(client, tenant, policy["id"]).json()["paused"] is True

    resumed = patch(client, tenant, policy["id"], {"paused": False})
    assert resumed.status_code == 200
    assert resumed.json() == {**policy, "paused": False}
    assert get_policy(client, tenant, policy["id"]).json() == policy


def test_patch_changes_only_what_it_names(client, tenant, endpoint):
    policy = endpoint_policy(client, tenant, endpoint["id"])
    assert patch(client, tenant, policy["id"], {}).json() == policy

    changed = patch(client, tenant, policy["id"], {"interval_seconds": 3600}).json()
    assert changed == {**policy, "interval_seconds": 3600}

    changed = patch(client, tenant, policy["id"], {"handoff": "in_band"}).json()
    assert changed["handoff"] == "in_band"
    assert changed["interval_seconds"] == 3600

    later = "2031-01-02T03:04:05.000Z"
    changed = patch(client, tenant, policy["id"], {"next_run_at": later}).json()
    assert changed["next_run_at"] == later
    assert changed["handoff"] == "in_band"
    # null leaves the next run alone.
    assert patch(client, tenant, policy["id"], {"next_run_at": None}).json() == changed

    changed = patch(client, tenant, policy["id"], {"strategy": "rotate", "handoff": "none"}).json()
    assert changed["strategy"] == "rotate"
    assert changed["handoff"] == "none"
    assert get_policy(client, tenant, policy["id"]).json() == changed


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"target": "org_secret"}, "target"),
        ({"target": "endpoint"}, "target"),
        ({"endpoint_id": "OTHER"}, "endpoint_id"),
        ({"endpoint_id": None}, "endpoint_id"),
        ({"interval_seconds": 59}, "interval_seconds"),
        ({"interval_seconds": "3600"}, "interval_seconds"),
        ({"strategy": "rotate"}, "handoff"),  # the policy hands off in band
        ({"strategy": "nope"}, "strategy"),
        ({"handoff": "maybe"}, "handoff"),
        ({"paused": "yes"}, "paused"),
        ({"paused": None}, "paused"),
        ({"next_run_at": "2031-01-02T03:04:05"}, "next_run_at"),
        ({"last_run_at": "2031-01-02T03:04:05Z"}, "last_run_at"),
        ({"id": MISSING_ID}, "id"),
        ({"colour": "blue"}, "colour"),
    ],
    ids=lambda value: str(value),
)
def test_invalid_updates_are_refused_and_change_nothing(client, tenant, endpoint, body, field):
    policy = endpoint_policy(client, tenant, endpoint["id"], handoff="in_band")
    if body.get("endpoint_id") == "OTHER":
        body = {"endpoint_id": create(client, tenant, url="https://hooks.example.com/x")["id"]}
    details = assert_validation(patch(client, tenant, policy["id"], body))
    assert field in details, details
    assert get_policy(client, tenant, policy["id"]).json() == policy


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"strategy": "safe_migrate"}, "strategy"),
        ({"handoff": "in_band"}, "handoff"),
        ({"interval_seconds": 30}, "interval_seconds"),
        ({"target": "endpoint"}, "target"),
    ],
    ids=lambda value: str(value),
)
def test_invalid_org_secret_updates_are_refused(client, tenant, body, field):
    policy = make_policy(client, tenant, target="org_secret", interval_seconds=DAY_S)
    assert field in assert_validation(patch(client, tenant, policy["id"], body))
    assert get_policy(client, tenant, policy["id"]).json() == policy


def test_an_org_secret_policy_can_be_paused(client, tenant):
    policy = make_policy(client, tenant, target="org_secret", interval_seconds=DAY_S)
    response = patch(client, tenant, policy["id"], {"paused": True, "interval_seconds": 3600})
    assert response.status_code == 200, response.text
    assert response.json() == {**policy, "paused": True, "interval_seconds": 3600}


# --- delete -------------------------------------------------------------------------------------


def test_delete_then_gone(client, tenant, endpoint):
    policy = endpoint_policy(client, tenant, endpoint["id"])
    kept = make_policy(client, tenant, target="org_secret", interval_seconds=DAY_S)

    deleted = client.delete(f"/v1/rotation-policies/{policy['id']}", headers=tenant.headers)
    assert deleted.status_code == 204
    assert deleted.content == b""
    assert_request_id(deleted)

    assert_error(get_policy(client, tenant, policy["id"]), 404, "NOT_FOUND", "not found")
    assert_error(patch(client, tenant, policy["id"], {"paused": True}), 404, "NOT_FOUND")
    again = client.delete(f"/v1/rotation-policies/{policy['id']}", headers=tenant.headers)
    assert_error(again, 404, "NOT_FOUND")
    assert listed_ids(client, tenant) == [kept["id"]]
    # The endpoint itself is untouched.
    assert client.get(f"/v1/webhooks/{endpoint['id']}", headers=tenant.headers).status_code == 200


def test_deleting_the_endpoint_ends_its_policy(client, tenant, endpoint):
    policy = endpoint_policy(client, tenant, endpoint["id"])
    another = create(client, tenant, url="https://hooks.example.com/another")
    kept = endpoint_policy(client, tenant, another["id"])
    org = make_policy(client, tenant, target="org_secret", interval_seconds=DAY_S)

    assert (
        client.delete(f"/v1/webhooks/{endpoint['id']}", headers=tenant.headers).status_code == 204
    )

    assert_error(get_policy(client, tenant, policy["id"]), 404, "NOT_FOUND")
    assert set(listed_ids(client, tenant)) == {kept["id"], org["id"]}
    assert get_policy(client, tenant, kept["id"]).json() == kept
    assert get_policy(client, tenant, org["id"]).json() == org


# --- scopes -------------------------------------------------------------------------------------


def test_org_secret_policies_need_org_admin_write(client, database, tenant):
    writer = add_key(database, tenant, ["webhooks:read", "webhooks:write"])
    admin = add_key(database, tenant, ["webhooks:read", "webhooks:write", "org:admin:write"])

    refused = post_policy(client, writer, target="org_secret", interval_seconds=DAY_S)
    assert_error(refused, 403, "FORBIDDEN", "missing required scope")
    assert listed_ids(client, tenant) == []

    policy = make_policy(client, admin, target="org_secret", interval_seconds=DAY_S)
    # Everyone who reads webhooks can see it, but only an admin changes or deletes it.
    assert get_policy(client, writer, policy["id"]).json() == policy
    assert_error(patch(client, writer, policy["id"], {"paused": True}), 403, "FORBIDDEN")
    assert_error(
        client.delete(f"/v1/rotation-policies/{policy['id']}", headers=writer.headers),
        403,
        "FORBIDDEN",
    )
    assert get_policy(client, admin, policy["id"]).json() == policy
    assert patch(client, admin, policy["id"], {"paused": True}).json()["paused"] is True
    deleted = client.delete(f"/v1/rotation-policies/{policy['id']}", headers=admin.headers)
    assert deleted.status_code == 204


def test_endpoint_policies_need_webhooks_write(client, database, tenant, endpoint):
    reader = add_key(database, tenant, ["webhooks:read"])
    writer = add_key(database, tenant, ["webhooks:write"])
    admin_only = add_key(database, tenant, ["org:admin:write"])
    body = {"target": "endpoint", "endpoint_id": endpoint["id"], "interval_seconds": DAY_S}

    for key in (reader, admin_only):
        assert_error(post_policy(client, key, **body), 403, "FORBIDDEN")
    assert listed_ids(client, tenant) == []

    policy = make_policy(client, writer, **body)  # no admin scope needed for an endpoint
    assert get_policy(client, reader, policy["id"]).json() == policy
    assert listed_ids(client, reader) == [policy["id"]]
    assert_error(patch(client, reader, policy["id"], {"paused": True}), 403, "FORBIDDEN")
    assert_error(
        client.delete(f"/v1/rotation-policies/{policy['id']}", headers=reader.headers),
        403,
        "FORBIDDEN",
    )
    assert patch(client, writer, policy["id"], {"paused": True}).json()["paused"] is True
    assert (
        client.delete(f"/v1/rotation-policies/{policy['id']}", headers=writer.headers).status_code
        == 204
    )
    # Reading needs webhooks:read.
    assert_error(client.get("/v1/rotation-policies", headers=writer.headers), 403, "FORBIDDEN")


def test_no_key_is_401(client, tenant, endpoint):
    policy = endpoint_policy(client, tenant, endpoint["id"])
    for method, path in [
        ("GET", "/v1/rotation-policies"),
        ("POST", "/v1/rotation-policies"),
        ("GET", f"/v1/rotation-policies/{policy['id']}"),
        ("PATCH", f"/v1/rotation-policies/{policy['id']}"),
        ("DELETE", f"/v1/rotation-policies/{policy['id']}"),
    ]:
        response = client.request(method, path, json={"paused": True})
        assert_error(response, 401, "UNAUTHORIZED", "authentication failed")
    assert get_policy(client, tenant, policy["id"]).json() == policy


# --- tenancy ------------------------------------------------------------------------------------


def test_another_organizations_policy_is_404(client, tenant, other, endpoint):
    policy = endpoint_policy(client, tenant, endpoint["id"])
    org = make_policy(client, tenant, target="org_secret", interval_seconds=DAY_S)
    for policy_id in (policy["id"], org["id"], MISSING_ID):
        assert_error(get_policy(client, other, policy_id), 404, "NOT_FOUND", "not found")
        assert_error(patch(client, other, policy_id, {"paused": True}), 404, "NOT_FOUND")
        assert_error(
            client.delete(f"/v1/rotation-policies/{policy_id}", headers=other.headers),
            404,
            "NOT_FOUND",
        )
    assert listed_ids(client, other) == []
    assert get_policy(client, tenant, policy["id"]).json() == policy
    assert get_policy(client, tenant, org["id"]).json() == org


def test_a_malformed_policy_id_is_422(client, tenant):
    assert_validation(get_policy(client, tenant, "not-a-uuid"), "policy_id")


# --- list ---------------------------------------------------------------------------------------


def test_list_is_newest_first_with_a_keyset_cursor(client, tenant, other):
    created = []
    for index in range(5):
        endpoint = create(client, tenant, url=f"https://hooks.example.com/{index}")
        created.append(endpoint_policy(client, tenant, endpoint["id"])["id"])
        clock.travel(timedelta(seconds=1))
    created.append(make_policy(client, tenant, target="org_secret", interval_seconds=DAY_S)["id"])
    make_policy(client, other, target="org_secret", interval_seconds=DAY_S)  # not listed

    first = client.get("/v1/rotation-policies", headers=tenant.headers)
    assert first.status_code == 200
    body = first.json()
    assert set(body) == {"success", "data", "meta"}
    assert body["success"] is True
    assert body["meta"] == {"limit": 50, "next_cursor": None}
    for policy in body["data"]:
        assert_policy(policy)
    assert [policy["id"] for policy in body["data"]] == created[::-1]

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/rotation-policies", params=params, headers=tenant.headers).json()
        assert page["meta"]["limit"] == 2
        assert len(page["data"]) <= 2
        seen += [policy["id"] for policy in page["data"]]
        pages += 1
        cursor = page["meta"]["next_cursor"]
        if cursor is None:
            break
        assert isinstance(cursor, str)
        assert cursor
    assert seen == created[::-1]
    assert pages == 3


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 101}, {"limit": "ten"}])
def test_list_limit_is_validated(client, tenant, params):
    assert "limit" in assert_validation(
        client.get("/v1/rotation-policies", params=params, headers=tenant.headers)
    )


def test_list_limit_bounds_are_accepted(client, tenant):
    for limit in (1, 100):
        response = client.get(
            "/v1/rotation-policies", params={"limit": limit}, headers=tenant.headers
        )
        assert response.status_code == 200
        assert response.json()["meta"] == {"limit": limit, "next_cursor": None}


def test_a_policy_can_be_paused_while_its_endpoint_is_paused(client, tenant, endpoint):
    """The endpoint is fixed once the policy exists: pausing it later must not lock the policy."""
    policy = endpoint_policy(client, tenant, endpoint["id"])
    client.patch(f"/v1/webhooks/{endpoint['id']}", json={"active": False}, headers=tenant.headers)

    response = patch(client, tenant, policy["id"], {"paused": True})

    assert response.status_code == 200, response.text
    assert response.json() == {**policy, "paused": True}


# --- org_endpoints: every endpoint of the organization, one bulk migrate per run ---------------


def test_an_org_endpoints_policy_safe_migrates_with_its_concurrency(client, tenant, endpoint):
    made = client.post(
        "/v1/rotation-policies",
        json={"target": "org_endpoints", "interval_seconds": DAY_S},
        headers=tenant.headers,
    )
    assert made.status_code == 201, made.text
    body = made.json()
    assert (body["strategy"], body["max_concurrency"], body["endpoint_id"]) == (
        "safe_migrate",
        5,
        None,
    )
    again = client.post(
        "/v1/rotation-policies",
        json={"target": "org_endpoints", "interval_seconds": DAY_S},
        headers=tenant.headers,
    )
    assert again.status_code == 409  # one per organization
    changed = client.patch(
        f"/v1/rotation-policies/{body['id']}", json={"max_concurrency": 9}, headers=tenant.headers
    )
    assert changed.json()["max_concurrency"] == 9


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"target": "org_endpoints", "strategy": "rotate"}, "strategy"),
        ({"target": "org_endpoints", "endpoint_id": "ENDPOINT"}, "endpoint_id"),
        (
            {"target": "endpoint", "endpoint_id": "ENDPOINT", "max_concurrency": 3},
            "max_concurrency",
        ),
    ],
)
def test_org_endpoints_settings_belong_to_it_alone(client, tenant, endpoint, fields, field):
    body = {"interval_seconds": DAY_S, **fields}
    if body.get("endpoint_id") == "ENDPOINT":
        body["endpoint_id"] = endpoint["id"]
    refused = client.post("/v1/rotation-policies", json=body, headers=tenant.headers)
    assert refused.status_code == 422
    assert field in refused.json()["error"]["details"]
