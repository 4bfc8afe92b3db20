"""Request and response shapes of the HTTP API (docs/api.md), and their JSON rendering.

Responses are rendered by hand into plain dicts (documented by the models below) so a hot
GET pays for one dict, not a model validation round trip.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from models.clock import rfc3339
from models.delivery import DeliveryAttempt
from models.endpoint import EndpointView, WebhookEndpoint
from models.operation import Operation
from models.policy import RotationPolicy


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class EndpointCreate(_Strict):
    url: str = Field(description="https:// URL that receives deliveries")
    events: list[str] = Field(description="1-50 subscribable event types, no duplicates")
    description: str = Field(default="", description="at most 200 characters")
    api_version: str = Field(default="2026-04-01", description="supported: 2026-04-01")


class EndpointUpdate(_Strict):
    """Partial update: only the fields present change. ``{}`` is accepted."""

    url: str = ""
    description: str = ""
    events: list[str] = Field(default_factory=list)
    active: bool = True
    api_version: str = Field(default="", description="immutable: present means 422")


class Endpoint(BaseModel):
    id: str
    org_id: str
    url: str
    description: str | None = Field(default=None, description="omitted when empty")
    events: list[str]
    active: bool
    api_version: str
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
    type: str = Field(description="a subscribable event type")
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
    event_type: str
    url: str
    attempt: int
    outcome: str = Field(description="success | retry | dead")
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
    outcome: str = Field(description="success | retry | dead")
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

    url: str | None = None
    events: list[str] | None = None
    description: str | None = None
    deadline_seconds: int = Field(default=900, description="60-86400")


class OperationError(BaseModel):
    code: str
    message: str


class OperationStepOut(BaseModel):
    name: str
    state: str = Field(description="pending | running | succeeded | failed | skipped")
    attempts: int
    started_at: str | None
    finished_at: str | None
    next_attempt_at: str | None
    last_error: str | None


class OperationOut(BaseModel):
    id: str
    org_id: str
    kind: str = Field(description="safe_migrate | scheduled_rotation | org_secret_rotation")
    state: str = Field(
        description="pending | running | awaiting_receiver | succeeded | rolled_back | failed"
        " | canceled"
    )
    trigger: str = Field(description="api | schedule")
    policy_id: str | None
    source_endpoint_id: str | None
    new_endpoint_id: str | None
    steps: list[OperationStepOut]
    deadline_at: str
    error: OperationError | None
    created_at: str
    updated_at: str
    finished_at: str | None


class OperationWithSecret(OperationOut):
    secret: str = Field(description="the new endpoint's secret; shown once")
    secret_displayed_once: bool = True


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


def operation_json(operation: Operation) -> dict[str, Any]:
    return {
        "id": str(operation.id),
        "org_id": str(operation.org_id),
        "kind": operation.kind,
        "state": operation.state,
        "trigger": operation.trigger,
        "policy_id": _str(operation.policy_id),
        "source_endpoint_id": _str(operation.source_endpoint_id),
        "new_endpoint_id": _str(operation.new_endpoint_id),
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
        "deadline_at": rfc3339(operation.deadline_at),
        "error": {"code": operation.error_code, "message": operation.error_message or ""}
        if operation.error_code
        else None,
        "created_at": rfc3339(operation.created_at),
        "updated_at": rfc3339(operation.updated_at),
        "finished_at": _time(operation.finished_at),
    }


def _str(value: object | None) -> str | None:
    return None if value is None else str(value)


# --- rotation policies -------------------------------------------------------------------------


class PolicyCreate(_Strict):
    target: str = Field(description="endpoint | org_secret")
    endpoint_id: uuid.UUID | None = Field(default=None, description="for target endpoint")
    strategy: str | None = Field(
        default=None, description="safe_migrate | rotate (default: safe_migrate for endpoints)"
    )
    interval_seconds: int = Field(description="at least 60")
    paused: bool = False
    handoff: str = Field(default="none", description="none | in_band (safe_migrate only)")
    next_run_at: datetime | None = Field(
        default=None, description="first run (default: one interval from now)"
    )


class PolicyUpdate(_Strict):
    """Partial update of a policy; target and endpoint are fixed."""

    strategy: str = "safe_migrate"
    interval_seconds: int = 60
    paused: bool = False
    handoff: str = "none"
    next_run_at: datetime | None = None


class Policy(BaseModel):
    id: str
    target: str
    endpoint_id: str | None
    strategy: str
    interval_seconds: int
    paused: bool
    handoff: str
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
        "next_run_at": rfc3339(policy.next_run_at),
        "last_run_at": _time(policy.last_run_at),
        "last_operation_id": _str(policy.last_operation_id),
    }
