"""Shared assertions and raw-database readers for the API tests."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import text
from ulid import ULID

from models.db import Database
from models.endpoint import create_endpoint
from tests.factories import Tenant, endpoint_body

ULID_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
RFC3339_Z_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")
SECRET_RE = re.compile(r"^[A-Za-z0-9+/]{43}=$")

ENDPOINT_FIELDS = {
    "id",
    "org_id",
    "url",
    "description",
    "events",
    "active",
    "api_version",
    "created_at",
    "updated_at",
    "deleted_at",
}
SECRET_FIELDS = {"secret", "secret_displayed_once"}


def assert_request_id(response: httpx.Response) -> str:
    """The response carries a 26-char ULID in X-Request-Id; returns it."""
    request_id = response.headers.get("x-request-id")
    assert request_id is not None, f"no X-Request-Id on {response.status_code} {response.text}"
    assert ULID_RE.match(request_id), request_id
    assert str(ULID.from_str(request_id)) == request_id
    return request_id


def assert_error(
    response: httpx.Response,
    status: int,
    code: str,
    message: str | None = None,
) -> dict[str, Any]:
    """The response is the contract's error envelope; returns its ``error`` object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"success", "error"}, body
    assert body["success"] is False
    error = body["error"]
    assert isinstance(error, dict)
    assert set(error) <= {"code", "message", "request_id", "details"}, error
    assert {"code", "message", "request_id"} <= set(error), error
    assert error["code"] == code, error
    assert isinstance(error["message"], str)
    assert error["message"]
    if message is not None:
        assert error["message"] == message, error
    assert error["request_id"] == assert_request_id(response)
    if "details" in error:
        assert isinstance(error["details"], dict)
        assert error["details"]
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in error["details"].items())
    return dict(error)


def assert_validation(response: httpx.Response, *fields: str) -> dict[str, str]:
    """A 422 envelope whose ``details`` names exactly ``fields`` (when given); returns details."""
    error = assert_error(response, 422, "VALIDATION_FAILED", "validation failed")
    assert "details" in error, error
    details: dict[str, str] = error["details"]
    if fields:
        assert set(details) == set(fields), details
    return details


def parse_time(value: str) -> datetime:
    assert RFC3339_Z_RE.match(value), value
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert parsed.tzinfo is not None
    assert parsed.utcoffset() == UTC.utcoffset(parsed)
    return parsed


def create(client: Any, tenant: Tenant, **overrides: Any) -> dict[str, Any]:
    """Create an endpoint through the API (201 expected); returns the response body."""
    response = client.post("/v1/webhooks", json=endpoint_body(**overrides), headers=tenant.headers)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def seed_endpoints(database: Database, tenant: Tenant, count: int) -> list[uuid.UUID]:
    """``count`` endpoints created through the domain function in one unit of work."""
    ids = []
    with database.session() as session:
        for index in range(count):
            created = create_endpoint(
                session,
                tenant.org_id,
                url=f"https://hooks.example.com/seed/{index}",
                events=["brand.vetted"],
            )
            ids.append(created.endpoint.id)
    return ids


def raw_rows(database: Database, table: str) -> list[dict[str, Any]]:
    """Every row of ``table`` as plain dicts (column name -> value), in a stable order."""
    with database.engine.connect() as connection:
        result = connection.execute(text(f"SELECT * FROM {table}"))  # noqa: S608 - our own names
        rows = [dict(row._mapping) for row in result]
    for row in rows:
        for key, value in row.items():
            if isinstance(value, memoryview):
                row[key] = bytes(value)
    return sorted(rows, key=lambda row: str(row["id"]))


def endpoint_row(database: Database, endpoint_id: str | uuid.UUID) -> dict[str, Any]:
    wanted = uuid.UUID(str(endpoint_id))
    for row in raw_rows(database, "webhook_endpoints"):
        if uuid.UUID(str(row["id"])) == wanted:
            return row
    raise AssertionError(f"no webhook_endpoints row {wanted}")


def live_count(database: Database, org_id: uuid.UUID) -> int:
    return sum(
        1
        for row in raw_rows(database, "webhook_endpoints")
        if uuid.UUID(str(row["org_id"])) == org_id and row["deleted_at"] is None
    )
