"""Hostile and broken requests: every one ends in the error envelope and changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from api.app import create_app
from api.middleware import RequestContextMiddleware
from tests.api.helpers import (
    assert_error,
    assert_request_id,
    assert_validation,
    create,
    raw_rows,
)
from tests.factories import endpoint_body, make_tenant

MAX_BODY = 1024 * 1024


@pytest.fixture
def tenant(database):
    return make_tenant(database)


@pytest.fixture
def existing(client, database, tenant):
    """One endpoint, and a snapshot of the table every test compares against at the end."""
    endpoint = create(client, tenant)
    before = raw_rows(database, "webhook_endpoints")
    yield endpoint
    assert raw_rows(database, "webhook_endpoints") == before


def _targets(endpoint_id: str) -> list[tuple[str, str]]:
    return [("POST", "/v1/webhooks"), ("PATCH", f"/v1/webhooks/{endpoint_id}")]


# --- bodies that are not a JSON object --------------------------------------------------------

NOT_AN_OBJECT = [
    pytest.param(b'{"url": "https://x.example.com", ', id="truncated"),
    pytest.param(b"{url: 1}", id="unquoted-key"),
    pytest.param(b"{'url': 'https://x.example.com'}", id="single-quotes"),
    pytest.param(b'{"url": "https://x.example.com",}', id="trailing-comma"),
    pytest.param(b"not json at all", id="text"),
    pytest.param(b"\xff\xfe\x00garbage", id="invalid-utf8"),
    pytest.param(b"[]", id="empty-array"),
    pytest.param(b'[{"url": "https://x.example.com"}]', id="array-of-object"),
    pytest.param(b'"a string"', id="string"),
    pytest.param(b"5", id="number"),
    pytest.param(b"true", id="boolean"),
    pytest.param(b"null", id="null"),
    pytest.param(b"", id="empty"),
    pytest.param(b"   \n", id="whitespace"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deeply-nested-array"),
    pytest.param(b'{"a":' * 50_000 + b"1" + b"}" * 50_000, id="deeply-nested-object"),
    pytest.param(
        b'{"url": "https://x.example.com/\\ud800", "events": ["brand.vetted"]}', id="lone-surrogate"
    ),
    pytest.param(b'{"description": "\\udfff"}', id="lone-low-surrogate"),
]


@pytest.mark.parametrize("raw", NOT_AN_OBJECT)
def test_a_body_that_is_not_a_json_object_is_422(client, tenant, existing, raw):
    for method, url in _targets(existing["id"]):
        response = client.request(
            method,
            url,
            content=raw,
            headers={**tenant.headers, "Content-Type": "application/json"},
        )
        assert_validation(response, "body")


def test_malformed_json_says_so(client, tenant, existing):
    response = client.post("/v1/webhooks", content=b"{nope", headers=tenant.headers)
    assert assert_validation(response, "body") == {"body": "malformed JSON"}


# --- wrong types and unknown fields -----------------------------------------------------------

WRONG_TYPES = [
    pytest.param("POST", {"url": 5}, "url", id="create-url-int"),
    pytest.param("POST", {"url": True}, "url", id="create-url-bool"),
    pytest.param("POST", {"url": {"host": "x"}}, "url", id="create-url-object"),
    pytest.param("POST", {"events": "x"}, "events", id="create-events-string"),
    pytest.param("POST", {"events": {"brand.vetted": True}}, "events", id="create-events-object"),
    pytest.param("POST", {"events": [["brand.vetted"]]}, "events.0", id="create-events-nested"),
    pytest.param("POST", {"description": ["x"]}, "description", id="create-description-list"),
    pytest.param("POST", {"api_version": 20260401}, "api_version", id="create-api-version-int"),
    pytest.param("PATCH", {"url": 5}, "url", id="patch-url-int"),
    pytest.param("PATCH", {"events": "x"}, "events", id="patch-events-string"),
    pytest.param("PATCH", {"active": "yes"}, "active", id="patch-active-yes"),
    pytest.param("PATCH", {"active": "true"}, "active", id="patch-active-string-true"),
    pytest.param("PATCH", {"active": 0}, "active", id="patch-active-zero"),
    pytest.param("PATCH", {"description": 12}, "description", id="patch-description-int"),
]


@pytest.mark.parametrize(("method", "changes", "field"), WRONG_TYPES)
def test_wrong_types_are_422_per_field(client, tenant, existing, method, changes, field):
    if method == "POST":
        url, body = "/v1/webhooks", endpoint_body(**changes)
    else:
        url, body = f"/v1/webhooks/{existing['id']}", changes
    response = client.request(method, url, json=body, headers=tenant.headers)
    details = assert_validation(response)
    assert field in details or field.split(".")[0] in details, details


@pytest.mark.parametrize(
    "extra",
    [{"org_id": "x"}, {"secret": "x"}, {"Url": "https://x.example.com"}, {"unknown": None}],
)
def test_unknown_fields_are_422(client, tenant, existing, extra):
    field = next(iter(extra))
    for method, url in _targets(existing["id"]):
        body = {**endpoint_body(), **extra} if method == "POST" else extra
        response = client.request(method, url, json=body, headers=tenant.headers)
        assert assert_validation(response, field) == {field: "unknown field"}


def test_non_json_content_type_with_json_body_still_needs_valid_json(client, tenant, existing):
    response = client.post(
        "/v1/webhooks",
        content=b"url=https://x.example.com&events=brand.vetted",
        headers={**tenant.headers, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert_validation(response, "body")


# --- size cap ---------------------------------------------------------------------------------


def _oversized_json() -> bytes:
    body = b'{"url": "https://x.example.com", "events": ["brand.vetted"], "description": "'
    return body + b"d" * (MAX_BODY + 10 - len(body)) + b'"}'


def test_body_over_one_mib_with_content_length_is_413(client, tenant, existing):
    raw = _oversized_json()
    assert len(raw) > MAX_BODY
    for method, url in _targets(existing["id"]):
        response = client.request(
            method, url, content=raw, headers={**tenant.headers, "Content-Type": "application/json"}
        )
        assert response.request.headers["content-length"] == str(len(raw))
        error = assert_error(response, 413, "PAYLOAD_TOO_LARGE")
        assert "details" not in error


def test_body_over_one_mib_chunked_is_413(client, tenant, existing):
    raw = _oversized_json()

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(raw), 64 * 1024):
            yield raw[start : start + 64 * 1024]

    for method, url in _targets(existing["id"]):
        response = client.request(
            method,
            url,
            content=chunks(),
            headers={**tenant.headers, "Content-Type": "application/json"},
        )
        assert "content-length" not in response.request.headers
        assert response.request.headers["transfer-encoding"] == "chunked"
        assert_error(response, 413, "PAYLOAD_TOO_LARGE")


def test_a_lying_small_content_length_does_not_bypass_the_cap(client, tenant, existing):
    raw = _oversized_json()

    def chunks() -> Iterator[bytes]:
        yield raw

    response = client.post(
        "/v1/webhooks",
        content=chunks(),
        headers={**tenant.headers, "Content-Type": "application/json", "Content-Length": "10"},
    )
    assert response.request.headers["content-length"] == "10"
    assert_error(response, 413, "PAYLOAD_TOO_LARGE")


def test_body_of_exactly_one_mib_is_read(client, tenant, existing):
    """At the cap the body is parsed (and refused for its content, not its size)."""
    head = b'{"url": "https://x.example.com", "events": ["brand.vetted"], "description": "'
    raw = head + b"d" * (MAX_BODY - len(head) - 2) + b'"}'
    assert len(raw) == MAX_BODY
    response = client.post(
        "/v1/webhooks", content=raw, headers={**tenant.headers, "Content-Type": "application/json"}
    )
    assert_validation(response, "description")


def test_unauthenticated_oversized_body_is_refused_too(client, existing):
    # A declared length over the cap is refused before anything else; a chunked one is never
    # read when the caller is not authenticated.
    assert_error(client.post("/v1/webhooks", content=_oversized_json()), 413, "PAYLOAD_TOO_LARGE")

    def chunks() -> Iterator[bytes]:
        yield _oversized_json()

    assert_error(client.post("/v1/webhooks", content=chunks()), 401, "UNAUTHORIZED")


# --- ids, routes, methods ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [
        ("GET", "", None),
        ("PATCH", "", {"description": "x"}),
        ("DELETE", "", None),
        ("POST", "/rotate-secret", None),
    ],
)
@pytest.mark.parametrize("bad_id", ["not-a-uuid", "123", "0190a1b2-0000-7000-8000-00000000000g"])
def test_non_uuid_id_is_422_naming_endpoint_id(
    client, tenant, existing, method, suffix, body, bad_id
):
    kwargs: dict[str, Any] = {"headers": tenant.headers}
    if body is not None:
        kwargs["json"] = body
    response = client.request(method, f"/v1/webhooks/{bad_id}{suffix}", **kwargs)
    details = assert_validation(response, "endpoint_id")
    assert details["endpoint_id"] == "must be a UUID"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/v1"),
        ("GET", "/v2/webhooks"),
        ("GET", "/v1/webhook"),
        ("POST", "/v1/endpoints"),
        ("GET", "/v1/webhooks/0190a1b2-0000-7000-8000-000000000000/nope"),
        ("DELETE", "/v1/webhooks/a/b/c"),
    ],
)
def test_unknown_route_is_404_envelope(client, tenant, existing, method, path):
    no_auth: dict[str, str] = {}
    for headers in (no_auth, tenant.headers):
        response = client.request(method, path, headers=headers)
        error = assert_error(response, 404, "NOT_FOUND", "not found")
        assert "details" not in error


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v1/webhooks", {"GET", "POST"}),
        ("DELETE", "/v1/webhooks", {"GET", "POST"}),
        ("PATCH", "/v1/webhooks", {"GET", "POST"}),
        ("PUT", "/v1/webhooks/{id}", {"GET", "PATCH", "DELETE"}),
        ("POST", "/v1/webhooks/{id}", {"GET", "PATCH", "DELETE"}),
        ("GET", "/v1/webhooks/{id}/rotate-secret", {"POST"}),
        ("DELETE", "/v1/webhooks/{id}/rotate-secret", {"POST"}),
        ("POST", "/healthz", {"GET"}),
    ],
)
def test_wrong_method_is_405_envelope(client, tenant, existing, method, path, allowed):
    url = path.format(id=existing["id"])
    no_auth: dict[str, str] = {}
    for headers in (no_auth, tenant.headers):
        response = client.request(method, url, headers=headers)
        assert_error(response, 405, "METHOD_NOT_ALLOWED")
        allow = {part.strip() for part in response.headers["allow"].split(",")}
        assert allow - {"HEAD"} == allowed, allow


# --- the last-resort 500 ----------------------------------------------------------------------


async def _boom(request: Request) -> JSONResponse:
    raise RuntimeError("boom-internal")


async def _fine(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


def _assert_opaque_500(response) -> None:
    error = assert_error(response, 500, "INTERNAL_ERROR")
    assert "details" not in error
    for leak in ("boom", "RuntimeError", "Traceback", "internal.py", __file__):
        assert leak not in response.text


def test_unhandled_exception_in_a_starlette_app_is_an_opaque_500():
    app = Starlette(
        routes=[Route("/boom", _boom), Route("/fine", _fine)],
        middleware=[Middleware(RequestContextMiddleware, max_body_bytes=MAX_BODY)],
    )
    with TestClient(app, raise_server_exceptions=False) as test_client:
        response = test_client.get("/boom")
        _assert_opaque_500(response)
        fine = test_client.get("/fine")
        assert fine.status_code == 200
        assert fine.json() == {"ok": True}
        assert assert_request_id(fine) != assert_request_id(response)


def test_middleware_alone_around_a_raising_app_is_an_opaque_500():
    async def raw_app(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom-internal")

    wrapped = RequestContextMiddleware(raw_app, max_body_bytes=MAX_BODY)
    test_client = TestClient(wrapped, raise_server_exceptions=False)  # no lifespan: it would raise
    _assert_opaque_500(test_client.get("/anything"))


def test_unhandled_exception_in_the_real_app_is_an_opaque_500(database):
    app = create_app()
    app.add_api_route("/v1/boom", _boom, methods=["GET"])
    with TestClient(app, raise_server_exceptions=False) as test_client:
        _assert_opaque_500(test_client.get("/v1/boom"))
        assert test_client.get("/healthz").status_code == 200
