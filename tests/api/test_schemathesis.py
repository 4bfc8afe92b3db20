"""Property-based run over the published OpenAPI document: no 5xx, and every error is the envelope.

Schemathesis' own pytest plugin does not run under the installed pytest (9.x: test items have no
``_nodeid``), so each operation's Hypothesis strategy is driven by a plain ``@given`` inside a
parametrized test. The tenant is created inside the Hypothesis body, so every generated example
gets a fresh organization (the autouse fixture empties the tables only after the whole test).
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from api.app import create_app
from models.db import Database
from models.endpoint import create_endpoint
from models.org import create_org, issue_key
from tests.api.helpers import ULID_RE
from tests.factories import Tenant

ERROR_FIELDS = {"code", "message", "request_id", "details"}
# Operations that would make real outbound HTTP calls (test deliveries) are left to their own tests.
SKIPPED_OPERATIONS = {"POST /v1/webhooks/{endpoint_id}/test"}
_SPEC = {
    label: operation
    for path, methods in create_app().openapi()["paths"].items()
    for method, operation in methods.items()
    if (label := f"{method.upper()} {path}") not in SKIPPED_OPERATIONS
}
OPERATIONS = sorted(_SPEC)
# Negative data needs something to break: operations with neither parameters nor a body have none.
RUNS = [
    pytest.param(label, GenerationMode.POSITIVE, id=f"{label}-positive") for label in OPERATIONS
]
RUNS += [
    pytest.param(label, GenerationMode.NEGATIVE, id=f"{label}-negative")
    for label in OPERATIONS
    if _SPEC[label].get("parameters") or _SPEC[label].get("requestBody")
]
RUN = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)


@pytest.fixture(scope="module")
def api_schema(app: Any) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def _tenant_with_endpoint(database: Database) -> tuple[Tenant, str]:
    """A fresh organization with an all-scopes key and one endpoint, in one unit of work."""
    with database.session() as session:
        org = create_org(session, "Fuzz")
        issued = issue_key(session, org.id, [])
        created = create_endpoint(
            session, org.id, url="https://hooks.example.com/fuzz", events=["brand.vetted"]
        )
    tenant = Tenant(org_id=org.id, key_id=issued.key_id, api_key=issued.api_key)
    return tenant, str(created.endpoint.id)


def _operation(api_schema: Any, label: str) -> Any:
    method, path = label.split(" ", 1)
    return api_schema[path][method]


def _header(response: Any, name: str) -> str | None:
    values = response.headers.get(name.lower())
    return values[0] if values else None


def _assert_contract(response: Any) -> None:
    status = response.status_code
    request_id = _header(response, "X-Request-Id")
    assert request_id is not None, response.headers
    assert ULID_RE.match(request_id), request_id
    assert status < 500, f"{status}: {response.content[:500]!r}"
    if 200 <= status < 300:
        return
    body = json.loads(response.content)
    assert isinstance(body, dict), body
    assert set(body) == {"success", "error"}, body
    assert body["success"] is False
    error = body["error"]
    assert isinstance(error, dict)
    assert {"code", "message", "request_id"} <= set(error) <= ERROR_FIELDS, error
    assert isinstance(error["code"], str)
    assert error["code"].isupper()
    assert isinstance(error["message"], str)
    assert error["message"]
    assert error["request_id"] == request_id
    if "details" in error:
        assert status == 422, body
        assert isinstance(error["details"], dict)
        assert error["details"]
        assert all(isinstance(value, str) for value in error["details"].values())
    if status == 422:
        assert error["code"] == "VALIDATION_FAILED", body
        assert "details" in error, body


def test_the_run_covers_the_webhook_routes() -> None:
    expected = {
        "POST /v1/webhooks",
        "GET /v1/webhooks",
        "GET /v1/webhooks/{endpoint_id}",
        "PATCH /v1/webhooks/{endpoint_id}",
        "DELETE /v1/webhooks/{endpoint_id}",
        "POST /v1/webhooks/{endpoint_id}/rotate-secret",
    }
    assert expected <= set(OPERATIONS)


@pytest.mark.parametrize(("label", "mode"), RUNS)
def test_api_never_fails_and_errors_are_enveloped(
    api_schema: Any, database: Any, label: str, mode: GenerationMode
) -> None:
    operation = _operation(api_schema, label)
    calls: list[int] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(RUN, max_examples=25 if mode is GenerationMode.POSITIVE else 15)
    def run(case: Any) -> None:
        tenant, endpoint_id = _tenant_with_endpoint(database)
        # Every other example aims at a real endpoint of the caller, or carries a valid url and
        # events for a create, so that success paths run too.
        aim = zlib.crc32(repr((case.path_parameters, case.body)).encode()) % 2 == 0
        params = case.path_parameters
        if aim and params and "endpoint_id" in params:
            params["endpoint_id"] = endpoint_id
        if aim and label == "POST /v1/webhooks" and isinstance(case.body, dict):
            body = {**case.body, "url": "https://hooks.example.com/x", "events": ["brand.vetted"]}
            body["api_version"] = "2026-04-01"
            if isinstance(body.get("description"), str):
                body["description"] = body["description"][:200]
            case.body = body
        response = case.call(headers=tenant.headers)
        calls.append(response.status_code)
        _assert_contract(response)

    run()
    assert calls, "no example was generated"


@pytest.mark.parametrize("label", OPERATIONS)
def test_api_without_credentials_is_enveloped(api_schema: Any, database: Any, label: str) -> None:
    operation = _operation(api_schema, label)

    @given(case=operation.as_strategy())
    @settings(RUN, max_examples=5)
    def run(case: Any) -> None:
        _tenant_with_endpoint(database)
        response = case.call()
        _assert_contract(response)
        if case.path.startswith("/v1/"):
            assert response.status_code in (401, 413), response.content

    run()
