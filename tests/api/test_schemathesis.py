"""Property-based run over the published OpenAPI document, with Schemathesis' checks.

Every operation is driven with positive data (the schema calls it valid: the server must accept
it, 2xx bodies must match the response schema) and negative data (the schema calls it invalid:
the server must refuse it with a 4xx), and every response must be the contract's: no 5xx, a
declared status and content type, errors in the envelope.

What a schema cannot state is arranged by the test, on positive data only: ids that name a
real resource of the caller (every other example aims at one; the event stream at a finished
operation, so that it ends), an endpoint policy's endpoint, an Idempotency-Key per request, the
cross-field rules of a policy (``in_band`` needs ``safe_migrate``; an org_secret policy names
no endpoint and rotates), ``http_status_min <= http_status_max`` and ``since <= until``.

Schemathesis' own pytest plugin does not run under the installed pytest (9.x: test items have no
``_nodeid``), so each operation's Hypothesis strategy is driven by a plain ``@given`` inside a
parametrized test; each test has an organization of its own.
"""

from __future__ import annotations

import json
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    ensure_resource_availability,
    negative_data_rejection,
    not_a_server_error,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import select

from api.app import create_app
from models import clock
from models import provider as providers
from models.db import Database
from models.delivery import Delivery, DeliveryAttempt, Event
from models.endpoint import WebhookEndpoint, create_endpoint
from models.ids import new_event_id, new_id
from models.migration import start_migration
from models.operation import OperationState
from models.org import create_org, issue_key
from models.policy import RotationPolicy, create_policy
from tests.api.helpers import ULID_RE
from tests.factories import Tenant

ERROR_FIELDS = {"code", "message", "request_id", "details"}
# Operations that make real outbound HTTP calls (test deliveries, calls to a remote provider)
# are left to their own tests (tests/operations/test_remote_migrate.py for the providers').
SKIPPED_OPERATIONS = {
    "POST /v1/webhooks/{endpoint_id}/test",
    "POST /v1/providers",
    "PATCH /v1/providers/{provider_id}",
    "GET /v1/providers/{provider_id}/webhooks",
}
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
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    positive_data_acceptance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def api_schema(app: Any) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@dataclass(frozen=True)
class Fuzzed:
    """An organization with an all-scopes key and one of each resource to aim at (one per
    test: examples that use up a resource, e.g. delete the endpoint, leave 404s behind)."""

    tenant: Tenant
    ids: dict[str, str]  # path parameter name -> a real id of the tenant's
    database: Database


def _fuzzed_tenant(database: Database) -> Fuzzed:
    """In one unit of work: an endpoint (free), an endpoint under migration (its operation),
    an endpoint with a rotation policy, and one delivery attempt."""
    now = clock.now()
    with database.session() as session:
        org = create_org(session, "Fuzz")
        issued = issue_key(session, org.id, [])
        endpoints = [
            create_endpoint(
                session, org.id, url=f"https://hooks.example.com/fuzz{n}", events=["brand.vetted"]
            ).endpoint
            for n in range(3)
        ]
        operation = start_migration(session, org.id, endpoints[1].id).operation
        ended = start_migration(session, org.id, endpoints[2].id).operation
        ended.state, ended.finished_at = OperationState.CANCELED, now
        policy = create_policy(
            session, org.id, target="endpoint", endpoint_id=endpoints[2].id, interval_seconds=3600
        )
        provider = providers.create(
            session,
            org.id,
            name="elsewhere",
            base_url="https://provider.example.com",
            api_key="am_live_" + "f" * 34,
        )
        event = Event(
            id=new_event_id(), org_id=org.id, type="brand.vetted", data={}, created_at=now
        )
        delivery = Delivery(
            id=new_id(),
            org_id=org.id,
            event_id=event.id,
            endpoint_id=endpoints[0].id,
            kind="event",
            state="succeeded",
            attempts=1,
            created_at=now,
            updated_at=now,
        )
        session.add(event)
        session.flush()
        session.add(delivery)
        session.flush()
        attempt = DeliveryAttempt(
            id=new_id(),
            org_id=org.id,
            delivery_id=delivery.id,
            endpoint_id=endpoints[0].id,
            event_id=event.id,
            event_type="brand.vetted",
            url=endpoints[0].url,
            attempt=1,
            outcome="success",
            response_status=200,
            response_time_ms=3,
            request_body_sha256="0" * 64,
            request_body_bytes=2,
            response_body_excerpt="",
            request_headers={},
            error=None,
            occurred_at=now,
        )
        session.add(attempt)
    tenant = Tenant(org_id=org.id, key_id=issued.key_id, api_key=issued.api_key)
    return Fuzzed(
        tenant=tenant,
        ids={
            "endpoint_id": str(endpoints[0].id),
            "operation_id": str(operation.id),
            "ended_operation_id": str(ended.id),
            "policy_id": str(policy.id),
            "provider_id": str(provider.id),
            "delivery_id": str(attempt.id),
        },
        database=database,
    )


def _arrange(label: str, case: Any, fuzzed: Fuzzed, number: int, *, aim: bool = True) -> None:
    """What the schema cannot state, made true of a positive case (see the module docstring);
    without ``aim``, path ids are left as generated (the stateful run takes them from links)."""
    # An Idempotency-Key names one request: another body under the same key is refused.
    if case.headers and case.headers.get("Idempotency-Key"):
        case.headers["Idempotency-Key"] = f"{case.headers['Idempotency-Key'][:240]}-{number}"
    # Every other example aims at the caller's own resources, so that success paths run too.
    aim = aim and zlib.crc32(repr((case.path_parameters, case.body)).encode()) % 2 == 0
    if aim and case.path_parameters:
        for name in case.path_parameters:
            if name in fuzzed.ids:
                case.path_parameters[name] = fuzzed.ids[name]
        if label == "GET /v1/operations/{operation_id}/events":
            case.path_parameters["operation_id"] = fuzzed.ids["ended_operation_id"]
    body = case.body
    if label == "POST /v1/webhooks/migrate" and isinstance(body, dict):
        # A selection the schema cannot state: live endpoints of the caller's, subscribed to
        # one of the filter's types (else 422, the selection is empty).
        if body.get("endpoint_ids") is not None:
            body["endpoint_ids"] = [fuzzed.ids["endpoint_id"]]
        if body.get("events") is not None:
            body["events"] = ["brand.vetted"]
    if label == "POST /v1/rotation-policies" and isinstance(body, dict):
        # max_concurrency belongs to org_endpoints policies only; a provider and a remote id
        # to remote_endpoint policies, which safe-migrate without handoff.
        if body.get("target") != "org_endpoints":
            body.pop("max_concurrency", None)
        if body.get("target") == "remote_endpoint":
            body.pop("endpoint_id", None)
            body["provider_id"] = fuzzed.ids["provider_id"]
            body["remote_endpoint_id"] = f"remote-{number}"
            body["handoff"] = "none"
            if body.get("strategy") is not None:
                body["strategy"] = "safe_migrate"
        else:
            body.pop("provider_id", None)
            body.pop("remote_endpoint_id", None)
        if body.get("target") == "org_endpoints":
            body.pop("endpoint_id", None)
            if body.get("strategy") is not None:
                body["strategy"] = "safe_migrate"
        elif body.get("target") == "remote_endpoint":
            pass
        elif body.get("target") == "org_secret":
            body.pop("endpoint_id", None)
            if body.get("strategy") is not None:
                body["strategy"] = "rotate"
            if "handoff" in body:
                body["handoff"] = "none"
        else:
            body["endpoint_id"] = _live_endpoint(fuzzed)
    if label == "PATCH /v1/rotation-policies/{policy_id}" and isinstance(body, dict):
        current = _policy(fuzzed.database, case.path_parameters.get("policy_id"))
        if current is None or current.target != "org_endpoints":
            body.pop("max_concurrency", None)
        if current is not None and current.target == "org_endpoints":
            body["strategy"] = "safe_migrate"
        if current is not None and current.target == "org_secret":
            body.update(
                {k: v for k, v in (("strategy", "rotate"), ("handoff", "none")) if k in body}
            )
        elif current is not None and body.get("strategy", current.strategy) == "rotate":
            body["handoff"] = "none"
    if label in ("POST /v1/rotation-policies", "PATCH /v1/rotation-policies/{policy_id}"):
        if isinstance(body, dict) and body.get("handoff") == "in_band" and "strategy" in body:
            body["strategy"] = "safe_migrate"
    query = case.query
    if label == "GET /v1/webhooks/deliveries" and query:
        for low, high in (("http_status_min", "http_status_max"), ("since", "until")):
            if query.get(low) is not None and query.get(high) is not None:
                pair = sorted([query[low], query[high]], key=_ordering(low))
                query[low], query[high] = pair


def _live_endpoint(fuzzed: Fuzzed) -> str:
    """An active endpoint of the caller's (earlier steps may have deleted or paused some)."""
    with fuzzed.database.session() as session:
        found = session.scalar(
            select(WebhookEndpoint.id).where(
                WebhookEndpoint.org_id == fuzzed.tenant.org_id,
                WebhookEndpoint.deleted_at.is_(None),
                WebhookEndpoint.active.is_(True),
            )
        )
        if found is None:
            found = create_endpoint(
                session,
                fuzzed.tenant.org_id,
                url="https://hooks.example.com/again",
                events=["brand.vetted"],
            ).endpoint.id
    return str(found)


def _policy(database: Database, policy_id: Any) -> RotationPolicy | None:
    try:
        key = uuid.UUID(str(policy_id))
    except ValueError:
        return None
    with database.session() as session:
        return session.get(RotationPolicy, key)


def _ordering(name: str) -> Any:
    if name == "since":
        from datetime import datetime

        return lambda value: datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return int


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
    if "details" in error:  # field errors, or a 409 naming what is busy (docs/api.md)
        assert (status, error["code"]) in {(422, "VALIDATION_FAILED"), (409, "CONFLICT")}, body
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
def test_api_accepts_what_its_schema_allows_and_refuses_the_rest(
    api_schema: Any, database: Any, label: str, mode: GenerationMode
) -> None:
    operation = _operation(api_schema, label)
    calls: list[int] = []

    fuzzed = _fuzzed_tenant(database)

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(RUN, max_examples=25 if mode is GenerationMode.POSITIVE else 15)
    def run(case: Any) -> None:
        if mode is GenerationMode.POSITIVE:
            _arrange(label, case, fuzzed, len(calls))
        headers = fuzzed.tenant.headers
        response = case.call(headers=headers)
        calls.append(response.status_code)
        _assert_contract(response)
        case.validate_response(response, checks=CHECKS, headers=headers)

    run()
    assert calls, "no example was generated"


@pytest.mark.parametrize("label", OPERATIONS)
def test_api_without_credentials_is_enveloped(api_schema: Any, database: Any, label: str) -> None:
    operation = _operation(api_schema, label)

    @given(case=operation.as_strategy())
    @settings(RUN, max_examples=5)
    def run(case: Any) -> None:
        _fuzzed_tenant(database)
        response = case.call()
        _assert_contract(response)
        if case.path.startswith("/v1/"):
            assert response.status_code in (401, 413), response.content

    run()


def test_links_between_operations_hold(api_schema: Any, database: Any) -> None:
    """Stateful: Schemathesis follows the links it infers from the schema (an endpoint created,
    then read, patched, migrated; the migration's operation read and canceled; policies;
    deliveries replayed), with its checks on every step, use-after-free included. Each scenario
    has an organization of its own. The event stream is left out (it lasts as long as its
    operation) and so are the test delivery and the providers' routes (calls out)."""
    steps: list[tuple[str, int]] = []
    machine = api_schema.exclude(path_regex=r"/(events|test)$|^/v1/providers").as_state_machine()

    class Links(machine):  # type: ignore[misc,valid-type]
        fuzzed: Fuzzed

        def setup(self) -> None:
            self.fuzzed = _fuzzed_tenant(database)

        def before_call(self, case: Any) -> None:
            # A link taken from a null field (an operation's new_endpoint_id before it exists)
            # names no resource: ask for one that does not exist.
            for name, value in (case.path_parameters or {}).items():
                if value is None:
                    case.path_parameters[name] = str(uuid.uuid4())
            if case.meta is None or case.meta.generation.mode.is_positive:
                _arrange(case.operation.label, case, self.fuzzed, len(steps), aim=False)

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"headers": self.fuzzed.tenant.headers}

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            steps.append((case.operation.label, response.status_code))
            _assert_contract(response)
            # Not ensure_resource_availability: deleting an endpoint ends its rotation policies
            # (docs/api.md), so a policy created earlier in the scenario is rightly gone.
            case.validate_response(
                response,
                excluded_checks=[ensure_resource_availability],
                headers=self.fuzzed.tenant.headers,
                recorder=getattr(self, "recorder", None),
            )

    Links.run(
        settings=settings(RUN, max_examples=15, stateful_step_count=6, phases=list(Phase)[1:])
    )
    # Steps on one resource, by an id an earlier step returned, did succeed.
    assert any("{" in label and 200 <= status < 300 for label, status in steps), steps
