"""Request and response shapes of the HTTP API (docs/api.md), and their JSON rendering.

Responses are rendered by hand into plain dicts (documented by the models below) so a hot
GET pays for one dict, not a model validation round trip.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Any

from fastapi import Header, Query
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from models.bulk import MAX_NAMED as BULK_MAX_ENDPOINTS
from models.clock import rfc3339
from models.delivery import DeliveryAttempt, Outcome
from models.endpoint import (
    MAX_DESCRIPTION,
    MAX_EVENTS,
    MAX_URL,
    URL_PATTERN,
    EndpointView,
    WebhookEndpoint,
)
from models.events import SUBSCRIBABLE_EVENT_TYPES, SUPPORTED_API_VERSIONS, SYSTEM_EVENT_TYPES
from models.idempotency import KEY_PATTERN, MAX_KEY_LENGTH
from models.operation import (
    CONCURRENCY_DEFAULT,
    CONCURRENCY_MAX,
    CONCURRENCY_MIN,
    DEADLINE_MAX_S,
    DEADLINE_MIN_S,
    Operation,
    OperationKind,
    OperationState,
    StepState,
    Trigger,
)
from models.org import API_KEY_PREFIX
from models.pagination import CURSOR_PATTERN
from models.policy import MAX_INTERVAL_S, Handoff, RotationPolicy, Strategy, Target
from models.provider import MAX_API_KEY, MAX_BASE_URL, MAX_NAME, REMOTE_ID_PATTERN, Provider
from rotator.settings import Settings

# --- constraints ---------------------------------------------------------------------------------
#
# Every constraint the server enforces is stated in the published schema, so that a request the
# schema calls valid is accepted and one it calls invalid gets a 422 (docs/api.md, Validation).
# Most are enforced by the domain checks in models/ (one rule, one message, whatever the
# caller: API, command line or worker); ``stated`` only writes them into the schema.


def stated(**schema: Any) -> Any:
    """JSON Schema keywords for a constraint a domain check enforces (with its own message)."""
    return Field(json_schema_extra=schema)


def _values(members: Iterable[str]) -> list[str]:
    return sorted(str(member) for member in members)


POLICY_MIN_INTERVAL_S: int = Settings.model_fields["policy_min_interval_seconds"].default
CURSOR_MAX = 512

Url = Annotated[str, stated(maxLength=MAX_URL, pattern=URL_PATTERN)]
EventType = Annotated[str, stated(enum=_values(SUBSCRIBABLE_EVENT_TYPES))]
AnyEventType = Annotated[str, stated(enum=_values(SUBSCRIBABLE_EVENT_TYPES | SYSTEM_EVENT_TYPES))]
EventTypes = Annotated[list[EventType], stated(minItems=1, maxItems=MAX_EVENTS, uniqueItems=True)]
Description = Annotated[str, stated(maxLength=MAX_DESCRIPTION, pattern="^[^\\u0000]*$")]
ApiVersion = Annotated[str, stated(enum=list(SUPPORTED_API_VERSIONS))]
OutcomeName = Annotated[str, stated(enum=_values(Outcome))]


def _integral(value: Any) -> Any:
    """JSON Schema's integer includes ``60.0``: take an integral float as the integer it is."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Integer = Annotated[int, BeforeValidator(_integral)]
DeadlineSeconds = Annotated[Integer, stated(minimum=DEADLINE_MIN_S, maximum=DEADLINE_MAX_S)]
IntervalSeconds = Annotated[Integer, stated(minimum=POLICY_MIN_INTERVAL_S, maximum=MAX_INTERVAL_S)]
TargetName = Annotated[str, stated(enum=_values(Target))]
StrategyName = Annotated[str, stated(enum=_values(Strategy))]
HandoffName = Annotated[str, stated(enum=_values(Handoff))]

# Query and header parameters, for the routes' signatures.
CursorParam = Annotated[
    str | None,
    Query(
        max_length=CURSOR_MAX,
        description="the previous page's meta.next_cursor",
        json_schema_extra={"pattern": CURSOR_PATTERN},
    ),
]
OperationStateParam = Annotated[
    str | None, Query(max_length=32, json_schema_extra={"enum": _values(OperationState)})
]
OperationKindParam = Annotated[
    str | None, Query(max_length=32, json_schema_extra={"enum": _values(OperationKind)})
]
EventTypeParam = Annotated[
    str | None,
    Query(
        max_length=64,
        json_schema_extra={"enum": _values(SUBSCRIBABLE_EVENT_TYPES | SYSTEM_EVENT_TYPES)},
    ),
]
OutcomeParam = Annotated[
    str | None, Query(max_length=16, json_schema_extra={"enum": _values(Outcome)})
]
# RFC 3339 with seconds and an offset, as format date-time says; a bare number (which pydantic
# would read as a Unix time) or a time without offset is refused.
RFC3339 = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
    r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
_RFC3339 = re.compile(RFC3339)


def _rfc3339(value: Any) -> Any:
    if isinstance(value, str) and not _RFC3339.match(value):
        raise ValueError("must be an RFC 3339 time with seconds and a UTC offset")
    return value


TimeParam = Annotated[datetime | None, BeforeValidator(_rfc3339), Query()]
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="the same key and body return the first response again for 24 hours",
        json_schema_extra={"maxLength": MAX_KEY_LENGTH, "pattern": KEY_PATTERN},
    ),
]


def _no_defaults(schema: dict[str, Any]) -> None:
    """A partial update's fields have no default: absent means unchanged."""
    for field in schema.get("properties", {}).values():
        field.pop("default", None)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class EndpointCreate(_Strict):
    url: Url = Field(description="https:// URL that receives deliveries")
    events: EventTypes = Field(description="1-50 subscribable event types, no duplicates")
    description: Description = Field(default="", description="at most 200 characters")
    api_version: ApiVersion = Field(default="2026-04-01", description="supported: 2026-04-01")


class EndpointUpdate(_Strict):
    """Partial update: only the fields present change. ``{}`` is accepted. ``api_version`` is
    immutable: present, it is refused (422)."""

    model_config = ConfigDict(json_schema_extra=_no_defaults)

    url: Url = ""
    description: Description = Field(default="", description="blank clears")
    events: EventTypes = Field(default_factory=list, description="replaces the set")
    active: bool = True
    # Parsed so that the 422 can say "is immutable"; left out of the schema, which allows no
    # property it does not list.
    api_version: SkipJsonSchema[str] = ""


class Endpoint(BaseModel):
    id: str
    org_id: str
    url: str
    description: str | None = Field(default=None, description="omitted when empty")
    events: list[EventType]
    active: bool
    api_version: ApiVersion
    created_at: str
    updated_at: str
    deleted_at: str | None


class EndpointWithSecret(Endpoint):
    secret: str = Field(description="standard base64 of 32 bytes; shown once")
    secret_displayed_once: bool = True


class ListMeta(BaseModel):
    limit: int
    next_cursor: str | None


class EndpointList(BaseModel):
    success: bool = True
    data: list[Endpoint]
    meta: ListMeta


def endpoint_json(
    endpoint: WebhookEndpoint | EndpointView, *, secret: str | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": str(endpoint.id),
        "org_id": str(endpoint.org_id),
        "url": endpoint.url,
    }
    if endpoint.description:
        body["description"] = endpoint.description
    body.update(
        events=list(endpoint.events),
        active=endpoint.active,
        api_version=endpoint.api_version,
        created_at=rfc3339(endpoint.created_at),
        updated_at=rfc3339(endpoint.updated_at),
        deleted_at=rfc3339(endpoint.deleted_at) if endpoint.deleted_at else None,
    )
    if secret is not None:
        body["secret"] = secret
        body["secret_displayed_once"] = True
    return body


def list_json(
    items: list[dict[str, Any]], *, limit: int, next_cursor: str | None
) -> dict[str, Any]:
    return {"success": True, "data": items, "meta": {"limit": limit, "next_cursor": next_cursor}}


# --- events, deliveries, org secret ------------------------------------------------------------


class EventPublish(_Strict):
    type: EventType = Field(description="a subscribable event type")
    data: dict[str, Any] = Field(default_factory=dict, description="the event payload")


class PublishedDelivery(BaseModel):
    id: str
    endpoint_id: str


class PublishedEvent(BaseModel):
    id: str
    type: str
    created_at: str
    deliveries: list[PublishedDelivery]


class DeliveryAttemptOut(BaseModel):
    id: str
    endpoint_id: str
    event_id: str
    event_type: AnyEventType
    url: str
    attempt: int
    outcome: OutcomeName
    response_status: int | None
    response_time_ms: int
    request_body_sha256: str
    request_body_bytes: int
    response_body_excerpt: str
    request_headers: dict[str, str] = Field(description="as sent; signature values redacted")
    error: str | None
    occurred_at: str


class DeliveryAttemptList(BaseModel):
    success: bool = True
    data: list[DeliveryAttemptOut]
    meta: ListMeta


class ReplayOut(BaseModel):
    delivery_id: str = Field(description="the delivery attempt that was replayed")
    endpoint_id: str
    event_type: str
    new_event_id: str
    enqueued_at: str


class TestDeliveryOut(BaseModel):
    event_id: str
    outcome: OutcomeName
    url: str
    response_status: int | None
    response_time_ms: int
    response_body_excerpt: str
    error: str | None


class OrgSecretRotated(BaseModel):
    webhook_secret: str = Field(description="standard base64 of 32 bytes; shown once")
    rotated_at: str
    previous_valid_until: str = Field(
        description="until when the previous secret (if there was one) still signs"
    )


def attempt_json(attempt: DeliveryAttempt) -> dict[str, Any]:
    return {
        "id": str(attempt.id),
        "endpoint_id": str(attempt.endpoint_id),
        "event_id": attempt.event_id,
        "event_type": attempt.event_type,
        "url": attempt.url,
        "attempt": attempt.attempt,
        "outcome": attempt.outcome,
        "response_status": attempt.response_status,
        "response_time_ms": attempt.response_time_ms,
        "request_body_sha256": attempt.request_body_sha256,
        "request_body_bytes": attempt.request_body_bytes,
        "response_body_excerpt": attempt.response_body_excerpt,
        "request_headers": dict(attempt.request_headers),
        "error": attempt.error,
        "occurred_at": rfc3339(attempt.occurred_at),
    }


# --- operations --------------------------------------------------------------------------------


class MigrateRequest(_Strict):
    """All optional: the new endpoint copies the old one's url, events and description."""

    url: Url | None = None
    events: EventTypes | None = None
    description: Description | None = None
    deadline_seconds: DeadlineSeconds = Field(default=900, description="60-86400")


class BulkMigrateRequest(_Strict):
    """All optional: by default every active endpoint of the organization is migrated."""

    endpoint_ids: (
        Annotated[
            list[uuid.UUID], stated(minItems=1, maxItems=BULK_MAX_ENDPOINTS, uniqueItems=True)
        ]
        | None
    ) = Field(default=None, description="default: every active endpoint")
    events: EventTypes | None = Field(
        default=None, description="keep only endpoints subscribed to one of these"
    )
    max_concurrency: Annotated[
        Integer, stated(minimum=CONCURRENCY_MIN, maximum=CONCURRENCY_MAX)
    ] = Field(default=CONCURRENCY_DEFAULT, description="children active at once, 1-50")
    deadline_seconds: DeadlineSeconds = Field(
        default=900, description="per child, from when it starts; 60-86400"
    )
    handoff: HandoffName = Field(default="none", description="in_band: secrets sent in band")
    dry_run: bool = Field(default=False, description="show the selection, start nothing")


class ChildSecret(BaseModel):
    source_endpoint_id: str
    secret: str


class BulkSelection(BaseModel):
    success: bool = True
    dry_run: bool = True
    endpoint_ids: list[str]


class OperationError(BaseModel):
    code: str
    message: str
    details: dict[str, str] | None = Field(
        default=None, description="a failed remote migrate: what it left at the provider"
    )


class OperationStepOut(BaseModel):
    name: str
    state: Annotated[str, stated(enum=_values(StepState))]
    attempts: int
    started_at: str | None
    finished_at: str | None
    next_attempt_at: str | None
    last_error: str | None


class ChildrenCounts(BaseModel):
    total: int
    pending: int
    running: int
    awaiting_receiver: int
    succeeded: int
    rolled_back: int
    failed: int
    canceled: int


class OperationOut(BaseModel):
    id: str
    org_id: str
    kind: Annotated[str, stated(enum=_values(OperationKind))]
    state: Annotated[str, stated(enum=_values(OperationState))]
    trigger: Annotated[str, stated(enum=_values(Trigger))]
    policy_id: str | None
    source_endpoint_id: str | None = Field(description="a remote migrate: the remote id")
    new_endpoint_id: str | None = Field(description="a remote migrate: the remote id")
    provider_id: str | None = Field(description="a remote migrate's provider")
    parent_id: str | None = Field(description="the bulk migrate this is a child of")
    children: ChildrenCounts | None = Field(
        default=None, description="a bulk migrate's children: in all and by state"
    )
    steps: list[OperationStepOut]
    deadline_at: str | None = Field(
        description="null for a bulk migrate, and for its children until they start"
    )
    error: OperationError | None
    created_at: str
    updated_at: str
    finished_at: str | None


class OperationWithSecret(OperationOut):
    secret: str = Field(description="the new endpoint's secret; shown once")
    secret_displayed_once: bool = True


class BulkStartedOut(OperationOut):
    secrets: list[ChildSecret] = Field(
        description="each child's new secret, shown once; empty with in_band handoff"
    )
    secrets_displayed_once: bool = True


class OperationList(BaseModel):
    success: bool = True
    data: list[OperationOut]
    meta: ListMeta


class RevealedSecret(BaseModel):
    operation_id: str
    new_endpoint_id: str | None
    secret: str
    secret_displayed_once: bool = True


def _time(value: datetime | None) -> str | None:
    return rfc3339(value) if value is not None else None


def operation_json(operation: Operation, children: dict[str, int] | None = None) -> dict[str, Any]:
    """The Operation object; ``children``: a bulk migrate's counts (models.bulk)."""
    extra: dict[str, Any] = {}
    if operation.kind == OperationKind.BULK_MIGRATE:
        extra["children"] = children or {"total": 0, **dict.fromkeys(_values(OperationState), 0)}
    return {
        "id": str(operation.id),
        "org_id": str(operation.org_id),
        "kind": operation.kind,
        "state": operation.state,
        "trigger": operation.trigger,
        "policy_id": _str(operation.policy_id),
        "source_endpoint_id": _str(operation.source_endpoint_id or operation.remote_source_id),
        "new_endpoint_id": _str(operation.new_endpoint_id or operation.remote_new_id),
        "provider_id": _str(operation.provider_id),
        "parent_id": _str(operation.parent_id),
        **extra,
        "steps": [
            {
                "name": step.name,
                "state": step.state,
                "attempts": step.attempts,
                "started_at": _time(step.started_at),
                "finished_at": _time(step.finished_at),
                "next_attempt_at": _time(step.next_attempt_at),
                "last_error": step.last_error,
            }
            for step in operation.steps
        ],
        "deadline_at": _time(operation.deadline_at),
        "error": _operation_error(operation),
        "created_at": rfc3339(operation.created_at),
        "updated_at": rfc3339(operation.updated_at),
        "finished_at": _time(operation.finished_at),
    }


def _operation_error(operation: Operation) -> dict[str, Any] | None:
    if not operation.error_code:
        return None
    error: dict[str, Any] = {"code": operation.error_code, "message": operation.error_message or ""}
    if operation.error_details:
        error["details"] = operation.error_details
    return error


def _str(value: object | None) -> str | None:
    return None if value is None else str(value)


# --- remote providers --------------------------------------------------------------------------

RemoteId = Annotated[str, Field(pattern=REMOTE_ID_PATTERN, description="the provider's own id")]
ProviderName = Annotated[str, stated(minLength=1, maxLength=MAX_NAME)]
BaseUrl = Annotated[
    str, stated(minLength=1, maxLength=MAX_BASE_URL, pattern=r"^https?://[\x21-\x7e]+$")
]
ProviderKey = Annotated[
    str, stated(maxLength=MAX_API_KEY, pattern=rf"^{API_KEY_PREFIX}[\x21-\x7e]+$")
]


class ProviderCreate(_Strict):
    """An account at another AgentMessage-compatible service; the key is checked there first."""

    name: ProviderName
    base_url: BaseUrl = Field(description="the service root; Rotator appends /v1/...")
    api_key: ProviderKey = Field(description="stored encrypted, never returned")


class ProviderUpdate(_Strict):
    """Rename, or replace the key (checked against the provider first)."""

    model_config = ConfigDict(json_schema_extra=_no_defaults)

    name: ProviderName = ""
    api_key: ProviderKey = ""


class ProviderOut(BaseModel):
    id: str
    name: str
    base_url: str
    key_prefix: str
    created_at: str
    updated_at: str


class ProviderList(BaseModel):
    success: bool = True
    data: list[ProviderOut]
    meta: ListMeta


class RemoteEndpointList(BaseModel):
    """The provider's endpoints, as it lists them."""

    success: bool = True
    data: list[dict[str, Any]]
    meta: ListMeta


def provider_json(provider: Provider) -> dict[str, Any]:
    return {
        "id": str(provider.id),
        "name": provider.name,
        "base_url": provider.base_url,
        "key_prefix": provider.key_prefix,
        "created_at": rfc3339(provider.created_at),
        "updated_at": rfc3339(provider.updated_at),
    }


# --- rotation policies -------------------------------------------------------------------------


class PolicyCreate(_Strict):
    """An endpoint policy names a live endpoint of the organization; an org_secret policy
    names none and rotates; ``in_band`` handoff needs ``safe_migrate``."""

    target: TargetName
    endpoint_id: uuid.UUID | None = Field(default=None, description="for target endpoint")
    strategy: StrategyName | None = Field(
        default=None, description="default: safe_migrate for endpoints, rotate for org_secret"
    )
    interval_seconds: IntervalSeconds
    paused: bool = False
    handoff: HandoffName = Field(default="none", description="in_band: safe_migrate only")
    next_run_at: datetime | None = Field(
        default=None, description="first run (default: one interval from now)"
    )
    max_concurrency: (
        Annotated[Integer, stated(minimum=CONCURRENCY_MIN, maximum=CONCURRENCY_MAX)] | None
    ) = Field(default=None, description="org_endpoints only: children at once (5)")
    provider_id: uuid.UUID | None = Field(default=None, description="remote_endpoint only")
    remote_endpoint_id: RemoteId | None = Field(
        default=None, description="remote_endpoint only: the endpoint's id at the provider"
    )


class PolicyUpdate(_Strict):
    """Partial update of a policy; target and endpoint are fixed."""

    model_config = ConfigDict(json_schema_extra=_no_defaults)

    strategy: StrategyName = "safe_migrate"
    interval_seconds: IntervalSeconds = POLICY_MIN_INTERVAL_S
    paused: bool = False
    handoff: HandoffName = "none"
    next_run_at: datetime | None = None
    max_concurrency: Annotated[
        Integer, stated(minimum=CONCURRENCY_MIN, maximum=CONCURRENCY_MAX)
    ] = CONCURRENCY_DEFAULT


class Policy(BaseModel):
    id: str
    target: TargetName
    endpoint_id: str | None
    strategy: StrategyName
    interval_seconds: int
    paused: bool
    handoff: HandoffName
    max_concurrency: int | None
    provider_id: str | None
    remote_endpoint_id: str | None = Field(description="followed to each migration's new id")
    next_run_at: str
    last_run_at: str | None
    last_operation_id: str | None


class PolicyList(BaseModel):
    success: bool = True
    data: list[Policy]
    meta: ListMeta


def policy_json(policy: RotationPolicy) -> dict[str, Any]:
    return {
        "id": str(policy.id),
        "target": policy.target,
        "endpoint_id": _str(policy.endpoint_id),
        "strategy": policy.strategy,
        "interval_seconds": policy.interval_seconds,
        "paused": policy.paused,
        "handoff": policy.handoff,
        "max_concurrency": policy.max_concurrency,
        "provider_id": _str(policy.provider_id),
        "remote_endpoint_id": policy.remote_endpoint_id,
        "next_run_at": rfc3339(policy.next_run_at),
        "last_run_at": _time(policy.last_run_at),
        "last_operation_id": _str(policy.last_operation_id),
    }
