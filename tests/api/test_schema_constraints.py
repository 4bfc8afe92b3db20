"""The published schema states what the server enforces, and the server enforces what the schema
states (the property-based run in test_schemathesis.py checks both at random; these pin the
cases it found, and the tightenings that made server and schema agree)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from models.endpoint import URL_PATTERN
from models.idempotency import KEY_PATTERN
from models.pagination import CURSOR_PATTERN
from tests.factories import Tenant, endpoint_body, make_tenant


@pytest.fixture
def tenant(database) -> Tenant:
    return make_tenant(database)


@pytest.fixture
def openapi(client) -> dict[str, Any]:
    return client.get("/openapi.json").json()


def _body_schema(openapi: dict[str, Any], path: str, method: str) -> dict[str, Any]:
    content = openapi["paths"][path][method]["requestBody"]["content"]
    schema: dict[str, Any] = content["application/json"]["schema"]
    return schema


def _parameter(openapi: dict[str, Any], path: str, method: str, name: str) -> dict[str, Any]:
    for parameter in openapi["paths"][path][method]["parameters"]:
        if parameter["name"] == name:
            schema: dict[str, Any] = parameter["schema"]
            return schema
    raise AssertionError(f"{method} {path} has no parameter {name}")


def _refused(response: Any, field: str) -> None:
    assert response.status_code == 422, response.text
    assert field in response.json()["error"]["details"], response.text


# --- what the schema states ---------------------------------------------------------------------


def test_filters_are_enums_and_cursors_have_a_pattern(openapi) -> None:
    state = _parameter(openapi, "/v1/operations", "get", "state")
    assert "awaiting_receiver" in state["enum"]
    assert "safe_migrate" in _parameter(openapi, "/v1/operations", "get", "kind")["enum"]
    event_type = _parameter(openapi, "/v1/webhooks/deliveries", "get", "event_type")
    assert {"brand.vetted", "webhook.test"} <= set(event_type["enum"])
    outcome = _parameter(openapi, "/v1/webhooks/deliveries", "get", "outcome")
    assert sorted(outcome["enum"]) == ["dead", "retry", "success"]
    for path in ("/v1/webhooks", "/v1/operations", "/v1/rotation-policies"):
        assert _parameter(openapi, path, "get", "cursor")["pattern"] == CURSOR_PATTERN


def test_endpoint_bodies_state_their_rules(openapi) -> None:
    create = _body_schema(openapi, "/v1/webhooks", "post")["properties"]
    assert create["url"]["pattern"] == URL_PATTERN
    assert create["url"]["maxLength"] == 2048
    assert (create["events"]["minItems"], create["events"]["maxItems"]) == (1, 50)
    assert create["events"]["uniqueItems"] is True
    assert "webhook.test" not in create["events"]["items"]["enum"]
    assert create["description"]["maxLength"] == 200
    assert create["api_version"]["enum"] == ["2026-04-01"]
    update = _body_schema(openapi, "/v1/webhooks/{endpoint_id}", "patch")
    # Immutable: not a property, and no property is allowed that is not listed.
    assert "api_version" not in update["properties"]
    assert update["additionalProperties"] is False
    assert all("default" not in field for field in update["properties"].values())


def test_migrate_and_policy_bodies_state_their_ranges(openapi) -> None:
    migrate = _body_schema(openapi, "/v1/webhooks/{endpoint_id}/migrate", "post")["properties"]
    deadline = migrate["deadline_seconds"]
    assert (deadline["minimum"], deadline["maximum"]) == (60, 86_400)
    header = _parameter(openapi, "/v1/webhooks/{endpoint_id}/migrate", "post", "Idempotency-Key")
    assert (header["maxLength"], header["pattern"]) == (255, KEY_PATTERN)
    policy = _body_schema(openapi, "/v1/rotation-policies", "post")["properties"]
    assert sorted(policy["target"]["enum"]) == [
        "endpoint",
        "org_endpoints",
        "org_secret",
        "remote_endpoint",
    ]
    assert policy["interval_seconds"]["minimum"] == 60
    bulk = _body_schema(openapi, "/v1/webhooks/migrate", "post")["properties"]
    concurrency = bulk["max_concurrency"]
    assert (concurrency["minimum"], concurrency["maximum"]) == (1, 50)
    assert (bulk["deadline_seconds"]["minimum"], bulk["deadline_seconds"]["maximum"]) == (
        60,
        86_400,
    )


def test_the_url_pattern_is_the_servers_rule() -> None:
    pattern = re.compile(URL_PATTERN)
    assert pattern.match("https://hooks.example.com:8443/a/b?c=d#e")
    for url in ("https://hööks.example.com/", "https://u:p@hooks.example.com/", "https://[::1]/"):
        assert not pattern.match(url), url


# --- what the server enforces, as stated -------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("https://hooks.example.com/é", id="non-ascii-path"),
        pytest.param("https://hööks.example.com/", id="non-ascii-host"),
        pytest.param("https://user:pw@hooks.example.com/", id="credentials"),
        pytest.param("https://[2001:db8::1]/", id="ipv6-literal"),
        pytest.param("https://-hooks.example.com/", id="host-starts-with-dash"),
    ],
)
def test_a_url_outside_the_pattern_is_refused(client, tenant, url) -> None:
    response = client.post("/v1/webhooks", json=endpoint_body(url=url), headers=tenant.headers)
    _refused(response, "url")


def test_a_url_inside_the_pattern_is_accepted(client, tenant) -> None:
    body = endpoint_body(url="https://hooks.example.com:8443/in?x=%C3%A9#frag")
    response = client.post("/v1/webhooks", json=body, headers=tenant.headers)
    assert response.status_code == 201, response.text


@pytest.mark.parametrize("key", ["clé", " padded", "tab\tinside", "x" * 256])
def test_an_idempotency_key_outside_the_pattern_is_refused(client, tenant, key) -> None:
    created = client.post("/v1/webhooks", json=endpoint_body(), headers=tenant.headers).json()
    response = client.post(
        f"/v1/webhooks/{created['id']}/migrate",
        headers={**tenant.headers, "Idempotency-Key": key.encode()},
    )
    _refused(response, "Idempotency-Key")


def test_an_integral_number_is_an_integer_and_a_fraction_is_not(client, tenant) -> None:
    created = client.post("/v1/webhooks", json=endpoint_body(), headers=tenant.headers).json()
    response = client.post(
        f"/v1/webhooks/{created['id']}/migrate",
        json={"deadline_seconds": 900.5},
        headers=tenant.headers,
    )
    _refused(response, "deadline_seconds")
    response = client.post(
        f"/v1/webhooks/{created['id']}/migrate",
        json={"deadline_seconds": 900.0},
        headers=tenant.headers,
    )
    assert response.status_code == 202, response.text


@pytest.mark.parametrize("cursor", ["0000", "1-" + "0" * 31, "x" * 40, "123-" + "A" * 32])
def test_a_cursor_outside_the_pattern_is_refused(client, tenant, cursor) -> None:
    response = client.get("/v1/webhooks", params={"cursor": cursor}, headers=tenant.headers)
    _refused(response, "cursor")


def test_any_cursor_inside_the_pattern_is_taken(client, tenant) -> None:
    for cursor in ("", "0-" + "0" * 32, "9" * 16 + "-" + "f" * 32):
        response = client.get("/v1/webhooks", params={"cursor": cursor}, headers=tenant.headers)
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("until", ["0.5", "1700000000", "2026-01-01T00:00Z", "2026-01-01T00:00:00"])
def test_a_time_filter_must_be_rfc3339_with_seconds_and_offset(client, tenant, until) -> None:
    response = client.get(
        "/v1/webhooks/deliveries", params={"until": until}, headers=tenant.headers
    )
    _refused(response, "until")
