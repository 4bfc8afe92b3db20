"""Authentication, scopes and request ids (docs/api.md, "Authentication and scopes")."""

from __future__ import annotations

import hashlib
import secrets
import string
import uuid
from datetime import timedelta

import pytest

from models import clock
from models.org import Principal, PrincipalCache, revoke_key
from tests.api.helpers import (
    assert_error,
    assert_request_id,
    create,
    endpoint_row,
    raw_rows,
)
from tests.factories import add_key, endpoint_body, make_tenant
from tests.support import overridden

MISSING_ID = "0190a1b2-0000-7000-8000-000000000000"

# (method, path template, scope it needs, body); {id} is a real endpoint of the tenant.
ROUTES = [
    ("POST", "/v1/webhooks", "webhooks:write", endpoint_body()),
    ("GET", "/v1/webhooks", "webhooks:read", None),
    ("GET", "/v1/webhooks/{id}", "webhooks:read", None),
    ("PATCH", "/v1/webhooks/{id}", "webhooks:write", {"description": "changed"}),
    ("DELETE", "/v1/webhooks/{id}", "webhooks:write", None),
    ("POST", "/v1/webhooks/{id}/rotate-secret", "webhooks:write", None),
]
ROUTE_IDS = [f"{method} {path}" for method, path, _, _ in ROUTES]


def _random_key(alphabet: str = string.ascii_lowercase + string.digits, length: int = 34) -> str:
    return "am_live_" + "".join(secrets.choice(alphabet) for _ in range(length))


def _call(client, method, path, endpoint_id, body, headers):
    url = path.format(id=endpoint_id)
    if body is None:
        return client.request(method, url, headers=headers)
    return client.request(method, url, json=body, headers=headers)


@pytest.fixture
def owner(client, database):
    """A tenant with every scope and one endpoint: (tenant, endpoint id)."""
    tenant = make_tenant(database)
    endpoint = create(client, tenant)
    return tenant, endpoint["id"]


# --- 401 --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "scope", "body"), ROUTES, ids=ROUTE_IDS)
def test_missing_authorization_header_is_401_on_every_route(
    client, database, owner, method, path, scope, body
):
    _, endpoint_id = owner
    before = raw_rows(database, "webhook_endpoints")
    response = _call(client, method, path, endpoint_id, body, {})
    assert_error(response, 401, "UNAUTHORIZED", "authentication failed")
    assert "details" not in response.json()["error"]
    assert raw_rows(database, "webhook_endpoints") == before


@pytest.mark.parametrize(
    "header",
    [
        "Basic {key}",
        "Token {key}",
        "{key}",
        "Bearer",
        "Bearer ",
        "Bearer{key}",
        "Bearer {key} extra",
        "Bearer {key},{key}",
    ],
)
def test_wrong_scheme_is_401(client, database, header):
    tenant = make_tenant(database)
    response = client.get(
        "/v1/webhooks", headers={"Authorization": header.format(key=tenant.api_key)}
    )
    assert_error(response, 401, "UNAUTHORIZED", "authentication failed")


def test_scheme_is_case_insensitive_and_the_control_works(client, database):
    tenant = make_tenant(database)
    assert client.get("/v1/webhooks", headers=tenant.headers).status_code == 200
    response = client.get("/v1/webhooks", headers={"Authorization": f"bearer {tenant.api_key}"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda key: "am_test_" + key[8:], id="wrong-prefix"),
        pytest.param(lambda key: "sk_live_" + key[8:], id="foreign-prefix"),
        pytest.param(lambda key: key[:-1], id="41-chars"),
        pytest.param(lambda key: key + "a", id="43-chars"),
        pytest.param(lambda key: key.upper(), id="all-uppercase"),
        pytest.param(lambda key: key[:8] + key[8:].upper(), id="uppercase-body"),
        pytest.param(lambda key: key[:-1] + "A", id="one-uppercase-char"),
        pytest.param(lambda key: key[:-1] + "-", id="punctuation"),
        pytest.param(lambda key: key[:8], id="prefix-only"),
        pytest.param(lambda key: "am_live_" + "é" * 34, id="non-ascii"),
    ],
)
def test_malformed_key_is_401(client, database, mangle):
    tenant = make_tenant(database)
    key = mangle(tenant.api_key)
    assert key != tenant.api_key
    headers = {"Authorization": f"Bearer {key}".encode()}
    response = client.get("/v1/webhooks", headers=headers)
    assert_error(response, 401, "UNAUTHORIZED", "authentication failed")


def test_unknown_well_formed_key_is_401(client, database):
    make_tenant(database)
    unknown = _random_key()
    assert len(unknown) == 42
    response = client.get("/v1/webhooks", headers={"Authorization": f"Bearer {unknown}"})
    assert_error(response, 401, "UNAUTHORIZED", "authentication failed")


def test_revoked_key_is_401_and_other_keys_of_the_org_still_work(client, database):
    tenant = make_tenant(database)
    other = add_key(database, tenant, ["webhooks:read"])
    assert client.get("/v1/webhooks", headers=tenant.headers).status_code == 200
    with database.session() as session:
        revoke_key(session, tenant.key_id)
    response = client.get("/v1/webhooks", headers=tenant.headers)
    assert_error(response, 401, "UNAUTHORIZED", "authentication failed")
    response = client.post("/v1/webhooks", json=endpoint_body(), headers=tenant.headers)
    assert_error(response, 401, "UNAUTHORIZED", "authentication failed")
    assert raw_rows(database, "webhook_endpoints") == []
    assert client.get("/v1/webhooks", headers=other.headers).status_code == 200


def test_a_revoked_key_keeps_reading_for_the_cache_time_and_never_writes(
    client, database, settings
):
    tenant = make_tenant(database)
    endpoint = create(client, tenant)
    path = f"/v1/webhooks/{endpoint['id']}"
    before = endpoint_row(database, endpoint["id"])
    assert client.get(path, headers=tenant.headers).status_code == 200  # now remembered
    with database.session() as session:
        revoke_key(session, tenant.key_id)
    assert client.get(path, headers=tenant.headers).status_code == 200
    response = client.patch(path, json={"description": "x"}, headers=tenant.headers)
    assert_error(response, 401, "UNAUTHORIZED", "authentication failed")
    assert endpoint_row(database, endpoint["id"]) == before
    clock.travel(timedelta(seconds=settings.auth_cache_seconds + 0.001))
    assert_error(client.get(path, headers=tenant.headers), 401, "UNAUTHORIZED")


def test_without_the_cache_a_revoked_key_stops_reading_at_once(client, database, settings):
    tenant = make_tenant(database)
    endpoint = create(client, tenant)
    path = f"/v1/webhooks/{endpoint['id']}"
    with overridden(settings, auth_cache_seconds=0.0):
        assert client.get(path, headers=tenant.headers).status_code == 200
        with database.session() as session:
            revoke_key(session, tenant.key_id)
        assert_error(client.get(path, headers=tenant.headers), 401, "UNAUTHORIZED")


def test_the_principal_cache_is_bounded_and_drops_its_oldest_entries():
    cache = PrincipalCache(60, max_entries=10)
    principals = {
        f"hash{i}": Principal(org_id=uuid.uuid4(), key_id=uuid.uuid4(), scopes=frozenset())
        for i in range(25)
    }
    for key_hash, principal in principals.items():
        cache.put(key_hash, principal)
    kept = [key_hash for key_hash in principals if cache.get(key_hash) is not None]
    assert 1 <= len(kept) <= 10
    assert "hash24" in kept
    assert "hash0" not in kept
    assert cache.get("hash24") == principals["hash24"]


def test_401_comes_before_validation(client, database):
    """A caller without a valid key learns nothing but 401: not 404, not 422."""
    make_tenant(database)
    for method, url in [
        ("GET", "/v1/webhooks/not-a-uuid"),
        ("GET", "/v1/webhooks?limit=0"),
        ("GET", f"/v1/webhooks/{MISSING_ID}"),
        ("PATCH", f"/v1/webhooks/{MISSING_ID}"),
        ("POST", "/v1/webhooks"),
    ]:
        response = client.request(method, url, content=b"{not json")
        assert_error(response, 401, "UNAUTHORIZED", "authentication failed")


# --- 403 --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "scope", "body"), ROUTES, ids=ROUTE_IDS)
def test_key_lacking_the_scope_is_403(client, database, owner, method, path, scope, body):
    tenant, endpoint_id = owner
    other_scopes = [
        s
        for s in ("webhooks:read", "webhooks:write", "org:admin:write", "events:write")
        if s != scope
    ]
    limited = add_key(database, tenant, other_scopes)
    before = raw_rows(database, "webhook_endpoints")
    response = _call(client, method, path, endpoint_id, body, limited.headers)
    assert_error(response, 403, "FORBIDDEN", "missing required scope")
    assert raw_rows(database, "webhook_endpoints") == before

    # The same request with exactly the needed scope goes through.
    allowed = add_key(database, tenant, [scope])
    response = _call(client, method, path, endpoint_id, body, allowed.headers)
    assert 200 <= response.status_code < 300, response.text


@pytest.mark.parametrize(("method", "path", "scope", "body"), ROUTES, ids=ROUTE_IDS)
def test_key_with_unrelated_scopes_only_is_403(client, database, owner, method, path, scope, body):
    tenant, endpoint_id = owner
    limited = add_key(database, tenant, ["org:admin:write", "events:write"])
    response = _call(client, method, path, endpoint_id, body, limited.headers)
    assert_error(response, 403, "FORBIDDEN", "missing required scope")


def test_403_comes_before_404_and_422(client, database):
    tenant = make_tenant(database, scopes=["webhooks:read"])
    response = client.patch(f"/v1/webhooks/{MISSING_ID}", json={"url": 5}, headers=tenant.headers)
    assert_error(response, 403, "FORBIDDEN", "missing required scope")
    response = client.delete("/v1/webhooks/not-a-uuid", headers=tenant.headers)
    assert_error(response, 403, "FORBIDDEN", "missing required scope")


def test_write_scope_does_not_imply_read(client, database):
    tenant = make_tenant(database, scopes=["webhooks:write"])
    endpoint = create(client, tenant)
    response = client.get(f"/v1/webhooks/{endpoint['id']}", headers=tenant.headers)
    assert_error(response, 403, "FORBIDDEN", "missing required scope")


# --- request ids ------------------------------------------------------------------------------


def test_every_response_has_a_distinct_ulid_request_id(client, database, owner):
    tenant, endpoint_id = owner
    responses = [
        client.get("/v1/webhooks", headers=tenant.headers),  # 200
        client.post("/v1/webhooks", json=endpoint_body(), headers=tenant.headers),  # 201
        client.get(f"/v1/webhooks/{endpoint_id}", headers=tenant.headers),  # 200
        client.patch(f"/v1/webhooks/{endpoint_id}", json={}, headers=tenant.headers),  # 200
        client.post(f"/v1/webhooks/{endpoint_id}/rotate-secret", headers=tenant.headers),  # 200
        client.delete(f"/v1/webhooks/{endpoint_id}", headers=tenant.headers),  # 204
        client.get("/healthz"),  # 200 outside /v1
    ]
    assert [r.status_code for r in responses] == [200, 201, 200, 200, 200, 204, 200]
    ids = [assert_request_id(response) for response in responses]
    assert len(set(ids)) == len(ids)


def test_error_bodies_repeat_the_request_id(client, database, owner):
    tenant, endpoint_id = owner
    reader = add_key(database, tenant, ["webhooks:read"])
    cases = [
        (client.get("/v1/webhooks"), 401, "UNAUTHORIZED"),
        (client.delete(f"/v1/webhooks/{endpoint_id}", headers=reader.headers), 403, "FORBIDDEN"),
        (client.get(f"/v1/webhooks/{MISSING_ID}", headers=tenant.headers), 404, "NOT_FOUND"),
        (client.get("/v1/webhooks?limit=0", headers=tenant.headers), 422, "VALIDATION_FAILED"),
        (client.get("/v1/no-such-route", headers=tenant.headers), 404, "NOT_FOUND"),
        (client.get("/no-such-route"), 404, "NOT_FOUND"),
        (client.put("/v1/webhooks", headers=tenant.headers), 405, "METHOD_NOT_ALLOWED"),
        (client.put(f"/v1/webhooks/{endpoint_id}"), 405, "METHOD_NOT_ALLOWED"),
    ]
    seen = set()
    for response, status, code in cases:
        error = assert_error(response, status, code)
        seen.add(error["request_id"])
    assert len(seen) == len(cases)


def test_a_client_supplied_request_id_is_not_echoed(client, database):
    tenant = make_tenant(database)
    headers = {**tenant.headers, "X-Request-Id": "client-chosen"}
    response = client.get("/v1/webhooks", headers=headers)
    assert assert_request_id(response) != "client-chosen"
    assert response.headers.get_list("x-request-id") == [response.headers["x-request-id"]]


# --- keys at rest -----------------------------------------------------------------------------


def test_api_keys_row_stores_only_hash_and_prefix(client, database):
    tenant = make_tenant(database)
    second = add_key(database, tenant, ["webhooks:read"])
    rows = raw_rows(database, "api_keys")
    assert len(rows) == 2
    by_id = {uuid.UUID(str(row["id"])): row for row in rows}
    for issued in (tenant, second):
        row = by_id[issued.key_id]
        assert row["key_hash"] == hashlib.sha256(issued.api_key.encode()).hexdigest()
        assert row["prefix"] == issued.api_key[:12]
        assert len(row["prefix"]) == 12
        random_part = issued.api_key[8:]
        for other in rows:
            for column, value in other.items():
                rendered = value.decode("latin-1") if isinstance(value, bytes) else str(value)
                assert issued.api_key not in rendered, column
                assert random_part not in rendered, column
                assert random_part[4:] not in rendered, column
    # The key still authenticates: the hash is what is looked up.
    assert client.get("/v1/webhooks", headers=second.headers).status_code == 200


def test_endpoint_row_is_owned_by_the_keys_organization(client, database):
    tenant = make_tenant(database)
    body = create(client, tenant)
    assert body["org_id"] == str(tenant.org_id)
    row = endpoint_row(database, body["id"])
    assert uuid.UUID(str(row["org_id"])) == tenant.org_id
