"""/v1/webhooks: shapes, validation, tenancy, pagination, the cap and secrets (docs/api.md)."""

from __future__ import annotations

import base64
import binascii
import json
import threading
import uuid
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from models import clock
from models.endpoint import WebhookEndpoint, signing_key
from models.events import SUBSCRIBABLE_EVENT_TYPES
from tests.api.helpers import (
    ENDPOINT_FIELDS,
    SECRET_FIELDS,
    SECRET_RE,
    assert_error,
    assert_request_id,
    assert_validation,
    create,
    endpoint_row,
    live_count,
    parse_time,
    raw_rows,
    seed_endpoints,
)
from tests.factories import endpoint_body, make_tenant

MISSING_ID = "0190a1b2-0000-7000-8000-000000000000"
ALL_EVENTS = sorted(SUBSCRIBABLE_EVENT_TYPES)


def _secret_bytes(secret: str) -> bytes:
    assert isinstance(secret, str)
    assert len(secret) == 44
    assert SECRET_RE.match(secret), secret
    raw = base64.b64decode(secret, validate=True)
    assert len(raw) == 32
    return raw


def _assert_endpoint(body: dict[str, Any], *, with_secret: bool) -> None:
    expected = set(ENDPOINT_FIELDS) | (SECRET_FIELDS if with_secret else set())
    if not body.get("description"):
        expected.discard("description")
    assert set(body) == expected, body
    assert uuid.UUID(body["id"]).version == 7
    assert str(uuid.UUID(body["id"])) == body["id"]
    assert str(uuid.UUID(body["org_id"])) == body["org_id"]
    assert isinstance(body["url"], str)
    if "description" in body:
        assert isinstance(body["description"], str)
        assert body["description"]
    assert isinstance(body["events"], list)
    assert all(isinstance(event, str) for event in body["events"])
    assert isinstance(body["active"], bool)
    assert body["api_version"] == "2026-04-01"
    parse_time(body["created_at"])
    parse_time(body["updated_at"])
    assert body["deleted_at"] is None
    if with_secret:
        _secret_bytes(body["secret"])
        assert body["secret_displayed_once"] is True


def _get(client, tenant, endpoint_id):
    return client.get(f"/v1/webhooks/{endpoint_id}", headers=tenant.headers)


def _list_all(client, tenant, limit: int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(100):
        params: dict[str, Any] = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        response = client.get("/v1/webhooks", params=params, headers=tenant.headers)
        assert response.status_code == 200, response.text
        page = response.json()
        assert page["meta"]["limit"] == limit
        assert len(page["data"]) <= limit
        items.extend(page["data"])
        cursor = page["meta"]["next_cursor"]
        if cursor is None:
            return items
        assert isinstance(cursor, str)
        assert cursor
        assert len(page["data"]) == limit
    raise AssertionError("pagination did not end")


def _assert_secret_absent(database, secret: str) -> None:
    """Neither the base64 secret nor its bytes (raw, hex or base64) occur in any stored column."""
    raw = base64.b64decode(secret)
    needles_text = [secret, raw.hex(), base64.urlsafe_b64encode(raw).decode().rstrip("=")]
    for table in ("webhook_endpoints", "api_keys", "organizations"):
        for row in raw_rows(database, table):
            for column, value in row.items():
                if isinstance(value, bytes):
                    assert raw not in value, (table, column)
                    assert secret.encode() not in value, (table, column)
                    rendered = value.hex()
                else:
                    rendered = json.dumps(value) if isinstance(value, list | dict) else str(value)
                for needle in needles_text:
                    assert needle not in rendered, (table, column)


# --- success shapes ---------------------------------------------------------------------------


def test_create_returns_the_endpoint_with_its_secret_once(client, database):
    tenant = make_tenant(database)
    response = client.post(
        "/v1/webhooks",
        json=endpoint_body(events=["wallet.balance_low", "brand.vetted"]),
        headers=tenant.headers,
    )
    assert response.status_code == 201, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert_request_id(response)
    body = response.json()
    _assert_endpoint(body, with_secret=True)
    assert "success" not in body
    assert "data" not in body
    assert body["org_id"] == str(tenant.org_id)
    assert body["url"] == "https://hooks.example.com/rotator"
    assert body["description"] == "ops hooks"
    assert body["events"] == ["wallet.balance_low", "brand.vetted"]
    assert body["active"] is True
    assert body["created_at"] == body["updated_at"]

    row = endpoint_row(database, body["id"])
    assert row["url"] == body["url"]
    assert row["deleted_at"] is None


def test_get_list_and_patch_show_the_same_object_without_secret(client, database):
    tenant = make_tenant(database)
    created = create(client, tenant)
    expected = {k: v for k, v in created.items() if k not in SECRET_FIELDS}

    got = _get(client, tenant, created["id"])
    assert got.status_code == 200
    _assert_endpoint(got.json(), with_secret=False)
    assert got.json() == expected

    listed = client.get("/v1/webhooks", headers=tenant.headers)
    assert listed.status_code == 200
    page = listed.json()
    assert set(page) == {"success", "data", "meta"}
    assert page["success"] is True
    assert page["meta"] == {"limit": 50, "next_cursor": None}
    assert page["data"] == [expected]

    patched = client.patch(f"/v1/webhooks/{created['id']}", json={}, headers=tenant.headers)
    assert patched.status_code == 200
    _assert_endpoint(patched.json(), with_secret=False)
    assert patched.json() == expected

    for response in (got, listed, patched):
        assert created["secret"] not in response.text
        assert "secret" not in response.text


def test_secrets_are_fresh_per_endpoint(client, database):
    tenant = make_tenant(database)
    secrets_seen = {create(client, tenant)["secret"] for _ in range(5)}
    assert len(secrets_seen) == 5


def test_default_api_version_and_explicit_supported_version(client, database):
    tenant = make_tenant(database)
    body = endpoint_body()
    body.pop("description")
    response = client.post("/v1/webhooks", json=body, headers=tenant.headers)
    assert response.status_code == 201
    assert response.json()["api_version"] == "2026-04-01"
    explicit = create(client, tenant, api_version="2026-04-01")
    assert explicit["api_version"] == "2026-04-01"


@pytest.mark.parametrize("description", [None, "", "   "])
def test_description_is_omitted_when_empty(client, database, description):
    tenant = make_tenant(database)
    body = endpoint_body()
    if description is None:
        body.pop("description")
    else:
        body["description"] = description
    response = client.post("/v1/webhooks", json=body, headers=tenant.headers)
    assert response.status_code == 201, response.text
    created = response.json()
    assert "description" not in created
    _assert_endpoint(created, with_secret=True)
    assert "description" not in _get(client, tenant, created["id"]).json()
    listed = client.get("/v1/webhooks", headers=tenant.headers).json()["data"]
    assert "description" not in listed[0]


def test_boundary_values_are_accepted(client, database):
    tenant = make_tenant(database)
    url = "https://hooks.example.com/" + "a" * (2048 - len("https://hooks.example.com/"))
    assert len(url) == 2048
    created = create(client, tenant, url=url, description="d" * 200, events=ALL_EVENTS)
    assert created["url"] == url
    assert created["description"] == "d" * 200
    assert created["events"] == ALL_EVENTS
    one = create(client, tenant, events=["lookup.completed"])
    assert one["events"] == ["lookup.completed"]


def test_url_with_port_path_and_query_is_kept_verbatim(client, database):
    tenant = make_tenant(database)
    url = "https://hooks.example.com:8443/a/b?x=1&y=%20"
    assert create(client, tenant, url=url)["url"] == url


# --- validation -------------------------------------------------------------------------------

TOO_LONG_URL = "https://hooks.example.com/" + "a" * 2048

CREATE_INVALID = [
    pytest.param({"url": "http://hooks.example.com/x"}, "url", "https", id="url-http"),
    pytest.param({"url": "ftp://hooks.example.com/x"}, "url", "https", id="url-ftp"),
    pytest.param({"url": "hooks.example.com/x"}, "url", None, id="url-no-scheme"),
    pytest.param({"url": "https:///path"}, "url", "host", id="url-no-host"),
    pytest.param({"url": "https://"}, "url", "host", id="url-empty-host"),
    pytest.param({"url": TOO_LONG_URL}, "url", "2048", id="url-too-long"),
    pytest.param({"url": ""}, "url", None, id="url-empty"),
    pytest.param({"url": "https://exa mple.com/"}, "url", None, id="url-space"),
    pytest.param({"url": "https://a.example.com/\u0000x"}, "url", None, id="url-nul"),
    pytest.param({"url": "https://a.example.com:99999/"}, "url", None, id="url-bad-port"),
    pytest.param({"url": 5}, "url", None, id="url-int"),
    pytest.param({"url": None}, "url", None, id="url-null"),
    pytest.param({"url": ["https://a.example.com/"]}, "url", None, id="url-list"),
    pytest.param({"events": []}, "events", None, id="events-empty"),
    pytest.param({"events": ["brand.vetted"] * 51}, "events", "50", id="events-51"),
    pytest.param(
        {"events": ["brand.vetted", "lookup.completed", "brand.vetted"]},
        "events",
        "duplicate",
        id="events-duplicate",
    ),
    pytest.param({"events": ["brand.vetted", "no.such"]}, "events", "no.such", id="events-unknown"),
    pytest.param({"events": ["webhook.test"]}, "events", "webhook.test", id="events-webhook-test"),
    pytest.param(
        {"events": ["brand.vetted", "webhook.test"]}, "events", "webhook.test", id="events-mixed"
    ),
    pytest.param({"events": ["Brand.Vetted"]}, "events", None, id="events-case"),
    pytest.param({"events": "brand.vetted"}, "events", None, id="events-string"),
    pytest.param({"events": [1]}, "events.0", None, id="events-int-item"),
    pytest.param({"description": "d" * 201}, "description", "200", id="description-201"),
    pytest.param({"description": "a\u0000b"}, "description", None, id="description-nul"),
    pytest.param({"description": 5}, "description", None, id="description-int"),
    pytest.param({"api_version": "2025-01-01"}, "api_version", None, id="api-version-old"),
    pytest.param({"api_version": ""}, "api_version", None, id="api-version-empty"),
    pytest.param({"api_version": None}, "api_version", None, id="api-version-null"),
    pytest.param({"active": False}, "active", "unknown field", id="active-on-create"),
    pytest.param({"secret": "x" * 44}, "secret", "unknown field", id="secret-on-create"),
]


@pytest.mark.parametrize(("overrides", "field", "fragment"), CREATE_INVALID)
def test_create_validation(client, database, overrides, field, fragment):
    tenant = make_tenant(database)
    response = client.post("/v1/webhooks", json=endpoint_body(**overrides), headers=tenant.headers)
    details = assert_validation(response, field)
    if fragment is not None:
        assert fragment in details[field], details
    assert raw_rows(database, "webhook_endpoints") == []


@pytest.mark.parametrize("missing", ["url", "events"])
def test_create_requires_url_and_events(client, database, missing):
    tenant = make_tenant(database)
    body = endpoint_body()
    body.pop(missing)
    assert_validation(client.post("/v1/webhooks", json=body, headers=tenant.headers), missing)


def test_create_reports_every_invalid_field(client, database):
    tenant = make_tenant(database)
    body = {
        "url": "http://x.example.com",
        "events": [],
        "description": "d" * 201,
        "api_version": "1999-01-01",
    }
    response = client.post("/v1/webhooks", json=body, headers=tenant.headers)
    assert_validation(response, "url", "events", "description", "api_version")
    assert raw_rows(database, "webhook_endpoints") == []


PATCH_INVALID = [
    pytest.param({"url": "http://hooks.example.com/x"}, "url", id="url-http"),
    pytest.param({"url": "https:///x"}, "url", id="url-no-host"),
    pytest.param({"url": TOO_LONG_URL}, "url", id="url-too-long"),
    pytest.param({"url": ""}, "url", id="url-empty"),
    pytest.param({"url": 5}, "url", id="url-int"),
    pytest.param({"url": None}, "url", id="url-null"),
    pytest.param({"events": []}, "events", id="events-empty"),
    pytest.param({"events": ["brand.vetted"] * 51}, "events", id="events-51"),
    pytest.param({"events": ["brand.vetted", "brand.vetted"]}, "events", id="events-duplicate"),
    pytest.param({"events": ["nope.nope"]}, "events", id="events-unknown"),
    pytest.param({"events": ["webhook.test"]}, "events", id="events-webhook-test"),
    pytest.param({"events": None}, "events", id="events-null"),
    pytest.param({"description": "d" * 201}, "description", id="description-201"),
    pytest.param({"description": None}, "description", id="description-null"),
    pytest.param({"active": "yes"}, "active", id="active-string"),
    pytest.param({"active": 1}, "active", id="active-int"),
    pytest.param({"active": None}, "active", id="active-null"),
    pytest.param({"api_version": "2026-04-01"}, "api_version", id="api-version-same"),
    pytest.param({"api_version": "2027-01-01"}, "api_version", id="api-version-other"),
    pytest.param({"secret": "x"}, "secret", id="secret"),
    pytest.param({"id": MISSING_ID}, "id", id="id"),
    pytest.param({"deleted_at": None}, "deleted_at", id="deleted-at"),
]


@pytest.mark.parametrize(("changes", "field"), PATCH_INVALID)
def test_patch_validation_changes_nothing(client, database, changes, field):
    tenant = make_tenant(database)
    created = create(client, tenant)
    before = endpoint_row(database, created["id"])
    clock.travel(timedelta(seconds=5))
    response = client.patch(f"/v1/webhooks/{created['id']}", json=changes, headers=tenant.headers)
    assert_validation(response, field)
    assert endpoint_row(database, created["id"]) == before
    assert _get(client, tenant, created["id"]).json() == {
        k: v for k, v in created.items() if k not in SECRET_FIELDS
    }


def test_patch_api_version_is_immutable_even_with_valid_changes(client, database):
    tenant = make_tenant(database)
    created = create(client, tenant)
    before = endpoint_row(database, created["id"])
    response = client.patch(
        f"/v1/webhooks/{created['id']}",
        json={"api_version": "2026-04-01", "description": "new"},
        headers=tenant.headers,
    )
    details = assert_validation(response, "api_version")
    assert "immutable" in details["api_version"]
    assert endpoint_row(database, created["id"]) == before


def test_patch_with_one_bad_field_applies_none_of_the_good_ones(client, database):
    tenant = make_tenant(database)
    created = create(client, tenant)
    before = endpoint_row(database, created["id"])
    response = client.patch(
        f"/v1/webhooks/{created['id']}",
        json={"url": "https://new.example.com/", "active": False, "events": []},
        headers=tenant.headers,
    )
    assert_validation(response, "events")
    assert endpoint_row(database, created["id"]) == before


def test_empty_patch_is_accepted_and_changes_nothing(client, database):
    tenant = make_tenant(database)
    created = create(client, tenant)
    before = endpoint_row(database, created["id"])
    clock.travel(timedelta(seconds=5))
    response = client.patch(f"/v1/webhooks/{created['id']}", json={}, headers=tenant.headers)
    assert response.status_code == 200, response.text
    assert response.json() == {k: v for k, v in created.items() if k not in SECRET_FIELDS}
    assert endpoint_row(database, created["id"]) == before


def test_patch_with_unchanged_values_keeps_updated_at(client, database):
    tenant = make_tenant(database)
    created = create(client, tenant)
    clock.travel(timedelta(seconds=5))
    same = {
        "url": created["url"],
        "description": created["description"],
        "events": created["events"],
        "active": True,
    }
    response = client.patch(f"/v1/webhooks/{created['id']}", json=same, headers=tenant.headers)
    assert response.status_code == 200, response.text
    assert response.json()["updated_at"] == created["updated_at"]


def test_patch_each_field(client, database):
    tenant = make_tenant(database)
    created = create(client, tenant, events=["brand.vetted", "wallet.balance_low"])
    endpoint_id = created["id"]
    url = f"/v1/webhooks/{endpoint_id}"
    last_updated = parse_time(created["updated_at"])

    def patch(changes: dict[str, Any]) -> dict[str, Any]:
        nonlocal last_updated
        clock.travel(timedelta(seconds=2))
        response = client.patch(url, json=changes, headers=tenant.headers)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        _assert_endpoint(body, with_secret=False)
        updated = parse_time(body["updated_at"])
        assert updated > last_updated
        last_updated = updated
        assert body["created_at"] == created["created_at"]
        assert body["id"] == endpoint_id
        assert body == _get(client, tenant, endpoint_id).json()
        return body

    body = patch({"url": "https://new.example.com/hook"})
    assert body["url"] == "https://new.example.com/hook"
    assert body["events"] == ["brand.vetted", "wallet.balance_low"]

    body = patch({"events": ["campaign.approved"]})
    assert body["events"] == ["campaign.approved"]

    body = patch({"events": ["lookup.completed", "brand.vetted"]})
    assert body["events"] == ["lookup.completed", "brand.vetted"]

    body = patch({"description": "  new words  "})
    assert body["description"] == "new words"

    body = patch({"description": ""})
    assert "description" not in body

    body = patch({"description": "again"})
    assert body["description"] == "again"
    body = patch({"description": "   "})
    assert "description" not in body

    body = patch({"active": False})
    assert body["active"] is False
    row = endpoint_row(database, endpoint_id)
    assert bool(row["active"]) is False
    assert row["deleted_at"] is None

    body = patch({"active": True})
    assert body["active"] is True

    body = patch({"url": "https://multi.example.com/", "active": False, "events": ALL_EVENTS})
    assert (body["url"], body["active"], body["events"]) == (
        "https://multi.example.com/",
        False,
        ALL_EVENTS,
    )
    assert body["api_version"] == "2026-04-01"
    # An inactive endpoint is still listed and still readable.
    listed = client.get("/v1/webhooks", headers=tenant.headers).json()["data"]
    assert [item["id"] for item in listed] == [endpoint_id]


def test_patch_body_must_be_present(client, database):
    tenant = make_tenant(database)
    created = create(client, tenant)
    response = client.patch(f"/v1/webhooks/{created['id']}", headers=tenant.headers)
    assert_validation(response, "body")


# --- tenancy and deletion ---------------------------------------------------------------------


def test_another_organizations_endpoint_is_404_everywhere(client, database):
    owner = make_tenant(database, name="Owner")
    intruder = make_tenant(database, name="Intruder")
    created = create(client, owner)
    endpoint_id = created["id"]
    before = endpoint_row(database, endpoint_id)

    responses = [
        client.get(f"/v1/webhooks/{endpoint_id}", headers=intruder.headers),
        client.patch(
            f"/v1/webhooks/{endpoint_id}", json={"active": False}, headers=intruder.headers
        ),
        client.patch(f"/v1/webhooks/{endpoint_id}", json={}, headers=intruder.headers),
        client.post(f"/v1/webhooks/{endpoint_id}/rotate-secret", headers=intruder.headers),
        client.delete(f"/v1/webhooks/{endpoint_id}", headers=intruder.headers),
    ]
    for response in responses:
        error = assert_error(response, 404, "NOT_FOUND", "not found")
        assert "details" not in error
        assert endpoint_id not in response.text
    listed = client.get("/v1/webhooks", headers=intruder.headers).json()
    assert listed["data"] == []
    assert endpoint_row(database, endpoint_id) == before
    # The owner still sees it, unchanged.
    assert _get(client, owner, endpoint_id).status_code == 200


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [
        ("GET", "", None),
        ("PATCH", "", {"active": False}),
        ("DELETE", "", None),
        ("POST", "/rotate-secret", None),
    ],
)
def test_unknown_id_is_404(client, database, method, suffix, body):
    tenant = make_tenant(database)
    create(client, tenant)
    kwargs: dict[str, Any] = {"headers": tenant.headers}
    if body is not None:
        kwargs["json"] = body
    response = client.request(method, f"/v1/webhooks/{uuid.uuid4()}{suffix}", **kwargs)
    assert_error(response, 404, "NOT_FOUND", "not found")


def test_delete_is_soft_and_hides_the_endpoint(client, database):
    tenant = make_tenant(database)
    kept = create(client, tenant, url="https://kept.example.com/")
    gone = create(client, tenant, url="https://gone.example.com/")
    clock.travel(timedelta(seconds=3))

    response = client.delete(f"/v1/webhooks/{gone['id']}", headers=tenant.headers)
    assert response.status_code == 204
    assert response.content == b""
    assert_request_id(response)

    for response in (
        _get(client, tenant, gone["id"]),
        client.patch(f"/v1/webhooks/{gone['id']}", json={}, headers=tenant.headers),
        client.post(f"/v1/webhooks/{gone['id']}/rotate-secret", headers=tenant.headers),
        client.delete(f"/v1/webhooks/{gone['id']}", headers=tenant.headers),
    ):
        assert_error(response, 404, "NOT_FOUND", "not found")

    listed = client.get("/v1/webhooks", headers=tenant.headers).json()
    assert [item["id"] for item in listed["data"]] == [kept["id"]]

    row = endpoint_row(database, gone["id"])
    assert row["deleted_at"] is not None
    assert row["url"] == "https://gone.example.com/"
    assert bool(row["active"]) is False
    assert endpoint_row(database, kept["id"])["deleted_at"] is None
    assert live_count(database, tenant.org_id) == 1


# --- listing ----------------------------------------------------------------------------------


def test_empty_list(client, database):
    tenant = make_tenant(database)
    response = client.get("/v1/webhooks", headers=tenant.headers)
    assert response.status_code == 200
    assert response.json() == {
        "success": True,
        "data": [],
        "meta": {"limit": 50, "next_cursor": None},
    }


def test_list_is_newest_first_and_scoped_to_the_organization(client, database):
    tenant = make_tenant(database)
    other = make_tenant(database, name="Other")
    created = []
    for index in range(5):
        created.append(create(client, tenant, url=f"https://h.example.com/{index}")["id"])
        create(client, other, url=f"https://other.example.com/{index}")
    listed = client.get("/v1/webhooks", headers=tenant.headers).json()["data"]
    assert [item["id"] for item in listed] == list(reversed(created))
    times = [parse_time(item["created_at"]) for item in listed]
    assert times == sorted(times, reverse=True)
    assert {item["org_id"] for item in listed} == {str(tenant.org_id)}


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 8, 100])
def test_cursor_walks_every_page_once(client, database, limit):
    tenant = make_tenant(database)
    ids = [str(endpoint_id) for endpoint_id in seed_endpoints(database, tenant, 7)]
    items = _list_all(client, tenant, limit)
    walked = [item["id"] for item in items]
    assert walked == list(reversed(ids))
    assert len(set(walked)) == len(walked) == 7


def test_cursor_breaks_created_at_ties_by_id(client, database):
    tenant = make_tenant(database)
    ids = seed_endpoints(database, tenant, 6)
    with database.engine.begin() as connection:
        stamp = connection.execute(
            text("SELECT created_at FROM webhook_endpoints ORDER BY created_at LIMIT 1")
        ).scalar_one()
        connection.execute(text("UPDATE webhook_endpoints SET created_at = :t"), {"t": stamp})
    for limit in (1, 2, 4):
        walked = [item["id"] for item in _list_all(client, tenant, limit)]
        assert walked == [str(i) for i in sorted(ids, reverse=True)]


def test_cursor_sees_endpoints_deleted_or_created_mid_walk_consistently(client, database):
    tenant = make_tenant(database)
    ids = [str(i) for i in seed_endpoints(database, tenant, 4)]
    first = client.get("/v1/webhooks", params={"limit": 2}, headers=tenant.headers).json()
    assert [item["id"] for item in first["data"]] == [ids[3], ids[2]]
    newer = create(client, tenant)["id"]
    assert client.delete(f"/v1/webhooks/{ids[1]}", headers=tenant.headers).status_code == 204
    second = client.get(
        "/v1/webhooks",
        params={"limit": 2, "cursor": first["meta"]["next_cursor"]},
        headers=tenant.headers,
    ).json()
    assert [item["id"] for item in second["data"]] == [ids[0]]
    assert second["meta"]["next_cursor"] is None
    assert newer not in [item["id"] for item in second["data"]]


def test_list_limit_bounds(client, database):
    tenant = make_tenant(database)
    seed_endpoints(database, tenant, 3)
    for good in (1, 100):
        response = client.get("/v1/webhooks", params={"limit": good}, headers=tenant.headers)
        assert response.status_code == 200
        assert response.json()["meta"]["limit"] == good
        assert len(response.json()["data"]) == min(good, 3)
    for bad in ("0", "101", "-1", "abc", "1.5", ""):
        response = client.get("/v1/webhooks", params={"limit": bad}, headers=tenant.headers)
        assert_validation(response, "limit")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        pytest.param("bogus", id="bogus"),
        pytest.param("!!!!", id="not-base64"),
        pytest.param("x" * 513, id="too-long"),
        pytest.param(_b64(b"not json"), id="not-json"),
        pytest.param(_b64(b'{"a": 1, "b": 2}'), id="object"),
        pytest.param(_b64(b"7"), id="number"),
        pytest.param(_b64(b'["2024-01-01T00:00:00", "' + MISSING_ID.encode() + b'"]'), id="naive"),
        pytest.param(_b64(b'["2024-01-01T00:00:00+00:00", 5]'), id="id-not-a-string"),
        pytest.param(_b64(b'["2024-01-01T00:00:00+00:00", "nope"]'), id="id-not-a-uuid"),
        pytest.param(_b64(b'[5, "' + MISSING_ID.encode() + b'"]'), id="time-not-a-string"),
        pytest.param(
            _b64(b'["0001-01-01T00:00:00+01:00", "' + MISSING_ID.encode() + b'"]'),
            id="time-underflows",
        ),
        pytest.param(
            _b64(b'["9999-12-31T23:59:59-01:00", "' + MISSING_ID.encode() + b'"]'),
            id="time-overflows",
        ),
        pytest.param(_b64(b"\xff\xfe\xfd"), id="not-utf8"),
    ],
)
def test_bogus_cursor_is_422(client, database, cursor):
    tenant = make_tenant(database)
    seed_endpoints(database, tenant, 2)
    response = client.get("/v1/webhooks", params={"cursor": cursor}, headers=tenant.headers)
    assert_validation(response, "cursor")


def test_a_cursor_is_opaque_but_bound_to_nothing_secret(client, database):
    tenant = make_tenant(database)
    seed_endpoints(database, tenant, 3)
    page = client.get("/v1/webhooks", params={"limit": 1}, headers=tenant.headers).json()
    cursor = page["meta"]["next_cursor"]
    try:
        decoded = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError):
        decoded = b""
    assert tenant.api_key.encode() not in decoded


# --- the cap ----------------------------------------------------------------------------------


def test_the_51st_endpoint_is_409_limit_exceeded(client, database):
    tenant = make_tenant(database)
    seed_endpoints(database, tenant, 49)
    fiftieth = client.post("/v1/webhooks", json=endpoint_body(), headers=tenant.headers)
    assert fiftieth.status_code == 201, fiftieth.text
    assert live_count(database, tenant.org_id) == 50

    response = client.post("/v1/webhooks", json=endpoint_body(), headers=tenant.headers)
    error = assert_error(response, 409, "LIMIT_EXCEEDED")
    assert "details" not in error
    assert "secret" not in response.text
    assert live_count(database, tenant.org_id) == 50

    # Another organization is not affected by this one's cap.
    other = make_tenant(database, name="Other")
    assert (
        client.post("/v1/webhooks", json=endpoint_body(), headers=other.headers).status_code == 201
    )

    # A deleted endpoint frees its slot.
    assert (
        client.delete(f"/v1/webhooks/{fiftieth.json()['id']}", headers=tenant.headers).status_code
        == 204
    )
    again = client.post("/v1/webhooks", json=endpoint_body(), headers=tenant.headers)
    assert again.status_code == 201, again.text
    assert live_count(database, tenant.org_id) == 50
    assert_error(
        client.post("/v1/webhooks", json=endpoint_body(), headers=tenant.headers),
        409,
        "LIMIT_EXCEEDED",
    )


def test_invalid_create_at_the_cap_is_still_422(client, database):
    tenant = make_tenant(database)
    seed_endpoints(database, tenant, 50)
    response = client.post("/v1/webhooks", json=endpoint_body(events=[]), headers=tenant.headers)
    assert_validation(response, "events")


def test_concurrent_creates_never_exceed_the_cap(app, database):
    tenant = make_tenant(database)
    seed_endpoints(database, tenant, 45)
    threads = 8
    barrier = threading.Barrier(threads)
    statuses: list[list[int]] = [[] for _ in range(threads)]
    failures: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            with TestClient(app, raise_server_exceptions=False) as own_client:
                barrier.wait(timeout=30)
                for _ in range(20):
                    response = own_client.post(
                        "/v1/webhooks",
                        json=endpoint_body(url=f"https://race.example.com/{index}"),
                        headers=tenant.headers,
                    )
                    statuses[index].append(response.status_code)
                    if response.status_code == 409:
                        assert response.json()["error"]["code"] == "LIMIT_EXCEEDED"
                        return
                    assert response.status_code == 201, response.text
        except BaseException as exc:  # reported below, on the test's thread
            failures.append(exc)

    pool = [threading.Thread(target=worker, args=(index,)) for index in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in pool)
    assert not failures, failures
    flat = [status for per_thread in statuses for status in per_thread]
    assert flat.count(201) == 5, statuses
    assert all(per_thread[-1] == 409 for per_thread in statuses), statuses
    assert live_count(database, tenant.org_id) == 50


# --- secrets ----------------------------------------------------------------------------------


def test_rotate_secret_replaces_it_at_once(client, database):
    tenant = make_tenant(database)
    created = create(client, tenant)
    old_secret = created["secret"]
    old_row = endpoint_row(database, created["id"])
    clock.travel(timedelta(seconds=2))

    response = client.post(f"/v1/webhooks/{created['id']}/rotate-secret", headers=tenant.headers)
    assert response.status_code == 200, response.text
    assert_request_id(response)
    rotated = response.json()
    _assert_endpoint(rotated, with_secret=True)
    new_secret = rotated["secret"]
    assert new_secret != old_secret
    assert parse_time(rotated["updated_at"]) > parse_time(created["updated_at"])
    unchanged = ENDPOINT_FIELDS - {"updated_at"}
    assert {k: rotated.get(k) for k in unchanged} == {k: created.get(k) for k in unchanged}

    new_row = endpoint_row(database, created["id"])
    assert new_row["secret_ciphertext"] != old_row["secret_ciphertext"]
    with database.session() as session:
        endpoint = session.get(WebhookEndpoint, uuid.UUID(created["id"]))
        assert endpoint is not None
        key = signing_key(session, endpoint)
    assert key == _secret_bytes(new_secret)
    assert key != base64.b64decode(old_secret)

    got = _get(client, tenant, created["id"]).json()
    assert got["updated_at"] == rotated["updated_at"]
    assert "secret" not in got

    again = client.post(f"/v1/webhooks/{created['id']}/rotate-secret", headers=tenant.headers)
    assert again.status_code == 200
    assert again.json()["secret"] not in (old_secret, new_secret)


def test_the_secret_is_never_shown_again_nor_stored_in_clear(client, database):
    tenant = make_tenant(database)
    created = create(client, tenant)
    rotated = client.post(
        f"/v1/webhooks/{created['id']}/rotate-secret", headers=tenant.headers
    ).json()
    secrets_shown = [created["secret"], rotated["secret"]]

    responses = [
        _get(client, tenant, created["id"]),
        client.get("/v1/webhooks", headers=tenant.headers),
        client.patch(
            f"/v1/webhooks/{created['id']}", json={"description": "x"}, headers=tenant.headers
        ),
        client.patch(f"/v1/webhooks/{created['id']}", json={}, headers=tenant.headers),
    ]
    for response in responses:
        assert response.status_code == 200
        for secret in secrets_shown:
            assert secret not in response.text
        assert "secret" not in response.text

    for secret in secrets_shown:
        _assert_secret_absent(database, secret)
    row = endpoint_row(database, created["id"])
    assert isinstance(row["secret_ciphertext"], bytes)
    assert len(row["secret_ciphertext"]) > 32


def test_failed_creates_store_nothing(client, database):
    tenant = make_tenant(database)
    seed_endpoints(database, tenant, 1)
    before = raw_rows(database, "webhook_endpoints")
    for body in (
        endpoint_body(url="http://x.example.com/"),
        endpoint_body(events=["webhook.test"]),
        endpoint_body(extra=1),
    ):
        assert client.post("/v1/webhooks", json=body, headers=tenant.headers).status_code == 422
    assert raw_rows(database, "webhook_endpoints") == before
