"""Safe migrate and the operations API operators watch (docs/api.md, "Operations")."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.orm import Session

from api import isolation
from api.deps import Caller, body_doc, read_json, require
from api.errors import responses
from api.schemas import (
    BulkMigrateRequest,
    BulkSelection,
    BulkStartedOut,
    CursorParam,
    IdempotencyKeyHeader,
    MigrateRequest,
    OperationKindParam,
    OperationList,
    OperationOut,
    OperationStateParam,
    OperationWithSecret,
    RevealedSecret,
    list_json,
    operation_json,
)
from models import bulk, idempotency
from models import migration as migrations
from models import operation as operations
from models.endpoint import get_endpoint
from models.errors import DomainError, NotFound
from models.operation import Version
from models.org import Scope
from workers.enqueue import send_after_commit
from workers.names import TaskName

router = APIRouter(tags=["operations"])

Reader = Annotated[Caller, Depends(require(Scope.WEBHOOKS_READ))]
Writer = Annotated[Caller, Depends(require(Scope.WEBHOOKS_WRITE))]
# Reveal and cancel: the scope depends on the operation's kind (``operations.write_scope``),
# checked once the operation is found, so another organization's id is 404 whatever the key.
Acting = Annotated[Caller, Depends(require(None))]

# An event stream polls the operation every SSE_POLL_S after a change, doubling up to
# SSE_POLL_MAX_S while nothing changes; a comment line every SSE_KEEPALIVE_S of quiet keeps
# proxies from closing it and tells the server soon when the client has gone.
SSE_POLL_S = 0.5
SSE_POLL_MAX_S = 2.0
SSE_KEEPALIVE_S = 15.0


def _migrate(
    session: Session,
    org_id: uuid.UUID,
    endpoint_id: uuid.UUID,
    body: MigrateRequest,
    key: str | None,
    api_key_id: uuid.UUID,
) -> dict[str, Any]:
    fingerprint = idempotency.request_fingerprint(
        str(endpoint_id), body.model_dump(exclude_unset=True)
    )
    if key is not None:  # without a key, start_migration locks the endpoint (or is a 404)
        try:
            get_endpoint(session, org_id, endpoint_id, for_update=True)  # serialise per endpoint
        except NotFound:
            # Deleted since the first request (its own migration may have finished): the first
            # response still stands for this key and body; another body stays 404, and another
            # API key's use of the key is 422 as ever.
            try:
                stored = idempotency.recall(
                    session, org_id, key, fingerprint, api_key_id=api_key_id
                )
            except idempotency.DifferentRequest:
                stored = None
            if stored is not None:
                return stored
            raise

    def start() -> dict[str, Any]:
        started = migrations.start_migration(
            session,
            org_id,
            endpoint_id,
            url=body.url,
            events=body.events,
            description=body.description,
            deadline_seconds=body.deadline_seconds,
        )
        send_after_commit(session, TaskName.OPERATION_ADVANCE, started.operation.id)
        return {
            **operation_json(started.operation),
            "secret": started.secret,
            "secret_displayed_once": True,
        }

    return idempotency.once(session, org_id, key, fingerprint, start, api_key_id=api_key_id)


@router.post(
    "/v1/webhooks/{endpoint_id}/migrate",
    status_code=202,
    response_model=OperationWithSecret,
    responses=responses(401, 403, 404, 409, 413, 422),
    openapi_extra=body_doc(MigrateRequest, required=False),
)
async def migrate_endpoint(
    endpoint_id: uuid.UUID,
    request: Request,
    caller: Writer,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JSONResponse:
    """Start a safe migrate: a new endpoint with a new secret (shown once, here), a test
    delivery until the receiver accepts it, then the old endpoint is deleted; past the
    deadline, or on cancel, the new endpoint is deleted and the old one stays."""
    body = await read_json(request, MigrateRequest, optional=True)
    if idempotency_key is not None:
        idempotency.check_key(idempotency_key)
    response = await caller.run(
        _migrate, endpoint_id, body, idempotency_key, caller.principal.key_id
    )
    return JSONResponse(response, status_code=202)


def _bulk_migrate(
    session: Session,
    org_id: uuid.UUID,
    body: BulkMigrateRequest,
    key: str | None,
    api_key_id: uuid.UUID,
) -> tuple[int, dict[str, Any]]:
    if body.dry_run:
        bulk.check(
            max_concurrency=body.max_concurrency,
            deadline_seconds=body.deadline_seconds,
            handoff=body.handoff,
        )
        chosen = bulk.select_endpoints(
            session, org_id, endpoint_ids=body.endpoint_ids, events=body.events
        )
        return 200, {
            "success": True,
            "dry_run": True,
            "endpoint_ids": [str(endpoint.id) for endpoint in chosen],
        }
    fingerprint = idempotency.request_fingerprint(
        "bulk_migrate", body.model_dump(exclude_unset=True, mode="json")
    )

    def start() -> dict[str, Any]:
        started = bulk.start(
            session,
            org_id,
            endpoint_ids=body.endpoint_ids,
            events=body.events,
            max_concurrency=body.max_concurrency,
            deadline_seconds=body.deadline_seconds,
            handoff=body.handoff,
        )
        for child_id in started.started:
            send_after_commit(session, TaskName.OPERATION_ADVANCE, child_id)
        parent = started.operation
        return {
            **operation_json(parent, bulk.children_counts(session, [parent.id]).get(parent.id)),
            "secrets": [
                {"source_endpoint_id": str(source_id), "secret": secret}
                for source_id, secret in started.secrets
            ],
            "secrets_displayed_once": True,
        }

    return 202, idempotency.once(session, org_id, key, fingerprint, start, api_key_id=api_key_id)


@router.post(
    "/v1/webhooks/migrate",
    status_code=202,
    response_model=BulkStartedOut,
    responses={
        200: {"model": BulkSelection, "description": "dry_run: the selection; nothing started"},
        **responses(401, 403, 409, 413, 422),
    },
    openapi_extra=body_doc(BulkMigrateRequest, required=False),
)
async def bulk_migrate(
    request: Request,
    caller: Writer,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JSONResponse:
    """Safe-migrate many endpoints in one operation (``bulk_migrate``): each selected endpoint
    gets a safe-migrate child, at most ``max_concurrency`` of them active at once. The 202
    shows every child's new secret once (none with ``handoff: in_band``)."""
    body = await read_json(request, BulkMigrateRequest, optional=True)
    if idempotency_key is not None:
        idempotency.check_key(idempotency_key)
    status, response = await caller.run(
        _bulk_migrate, body, idempotency_key, caller.principal.key_id
    )
    return JSONResponse(response, status_code=status)


def _rendered(session: Session, items: list[operations.Operation]) -> list[dict[str, Any]]:
    """Operation objects, each bulk migrate with its children's counts."""
    counts = bulk.children_counts(
        session,
        [item.id for item in items if item.kind == operations.OperationKind.BULK_MIGRATE],
    )
    return [operation_json(item, counts.get(item.id)) for item in items]


def _list(
    session: Session,
    org_id: uuid.UUID,
    *,
    state: str | None,
    kind: str | None,
    endpoint_id: uuid.UUID | None,
    parent_id: uuid.UUID | None,
    limit: int,
    cursor: str | None,
) -> dict[str, Any]:
    page = operations.list_operations(
        session,
        org_id,
        state=state,
        kind=kind,
        endpoint_id=endpoint_id,
        parent_id=parent_id,
        limit=limit,
        cursor=cursor,
    )
    return list_json(_rendered(session, page.items), limit=limit, next_cursor=page.next_cursor)


@router.get("/v1/operations", response_model=OperationList, responses=responses(401, 403, 422))
async def list_operations(
    caller: Reader,
    state: OperationStateParam = None,
    kind: OperationKindParam = None,
    endpoint_id: uuid.UUID | None = None,
    parent_id: uuid.UUID | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    cursor: CursorParam = None,
) -> JSONResponse:
    """Top-level operations of the caller's organization, newest first; ``parent_id``: one
    bulk migrate's children; ``endpoint_id``: every operation using it, children included."""
    return JSONResponse(
        await caller.run(
            _list,
            state=state,
            kind=kind,
            endpoint_id=endpoint_id,
            parent_id=parent_id,
            limit=limit,
            cursor=cursor,
        )
    )


def _get(session: Session, org_id: uuid.UUID, operation_id: uuid.UUID) -> dict[str, Any]:
    return _rendered(session, [operations.get_operation(session, org_id, operation_id)])[0]


@router.get(
    "/v1/operations/{operation_id}",
    response_model=OperationOut,
    responses=responses(401, 403, 404, 422),
)
async def get_operation(operation_id: uuid.UUID, caller: Reader) -> JSONResponse:
    """One operation with its steps."""
    return JSONResponse(await caller.run(_get, operation_id))


@router.get(
    "/v1/operations/{operation_id}/events",
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "one event per change"},
        **responses(401, 403, 404, 422, 429),
    },
)
async def operation_events(
    operation_id: uuid.UUID, request: Request, caller: Reader
) -> StreamingResponse:
    """Server-Sent Events: the operation as it changes (event ``operation``), until it ends.

    At most ``ROTATOR_SSE_STREAMS_PER_KEY`` open per API key; beyond, 429."""
    # The version first: a change between the two reads shows at the first poll.
    version = await operations.read_version(caller.reads, caller.principal.org_id, operation_id)
    first = await caller.run(_get, operation_id)  # 404 before the stream starts
    settings = caller.db.settings
    release = isolation.streams.take(caller.principal.key_id, settings.sse_streams_per_key)
    return isolation.HeldStreamingResponse(
        _operation_stream(
            request, caller, operation_id, (first, version), settings.sse_stream_max_seconds
        ),
        release=release,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _operation_stream(
    request: Request,
    caller: Caller,
    operation_id: uuid.UUID,
    first: tuple[dict[str, Any], Version | None],
    lifetime_s: float,
) -> AsyncIterator[str]:
    """One frame per change, found by polling the operation's version (one primary-key read
    per interval, backing off while nothing changes); the whole operation is read only when
    it changed. Ends with the operation, after ``lifetime_s``, or when the client goes away."""
    loop = asyncio.get_running_loop()
    ends_at = loop.time() + lifetime_s
    last, version = first
    sequence = 1
    yield _frame(sequence, last)
    interval = quiet = 0.0
    while last["finished_at"] is None:
        interval = min(interval * 2, SSE_POLL_MAX_S) if interval else SSE_POLL_S
        await asyncio.sleep(interval)
        quiet += interval
        if loop.time() >= ends_at or await request.is_disconnected():
            return
        seen = await operations.read_version(caller.reads, caller.principal.org_id, operation_id)
        if seen is None:
            return
        if seen != version:
            version, interval = seen, 0.0
            try:
                current = await caller.run(_get, operation_id)
            except DomainError:  # the key was revoked meanwhile, or the operation is gone
                return
            if current != last:
                sequence += 1
                yield _frame(sequence, current)
                last, quiet = current, 0.0
        if quiet >= SSE_KEEPALIVE_S:
            yield ": keep-alive\n\n"
            quiet = 0.0


def _frame(sequence: int, operation: dict[str, Any]) -> str:
    return f"event: operation\nid: {sequence}\ndata: {json.dumps(operation)}\n\n"


def _cancel(
    session: Session, org_id: uuid.UUID, operation_id: uuid.UUID, scopes: frozenset[str]
) -> dict[str, Any]:
    operation, wake = bulk.cancel(session, org_id, operation_id, scopes=scopes)
    for woken in wake:
        send_after_commit(session, TaskName.OPERATION_ADVANCE, woken)
    return _rendered(session, [operation])[0]


@router.post(
    "/v1/operations/{operation_id}/cancel",
    status_code=202,
    response_model=OperationOut,
    responses=responses(401, 403, 404, 409, 422),
)
async def cancel_operation(operation_id: uuid.UUID, caller: Acting) -> JSONResponse:
    """Roll back: the new endpoint is deleted, the old one stays. 409 once the old endpoint is
    deleted or the operation has ended. Scope: ``org:admin:write`` for an
    ``org_secret_rotation``, ``webhooks:write`` for any other kind."""
    response = await caller.run(_cancel, operation_id, caller.principal.scopes)
    return JSONResponse(response, status_code=202)


def _reveal(
    session: Session, org_id: uuid.UUID, operation_id: uuid.UUID, scopes: frozenset[str]
) -> dict[str, Any]:
    operation, secret = operations.reveal_secret(session, org_id, operation_id, scopes=scopes)
    return {
        "operation_id": str(operation.id),
        "new_endpoint_id": None
        if operation.new_endpoint_id is None
        else str(operation.new_endpoint_id),
        "secret": secret,
        "secret_displayed_once": True,
    }


@router.post(
    "/v1/operations/{operation_id}/reveal-secret",
    response_model=RevealedSecret,
    responses=responses(401, 403, 404, 409, 422),
)
async def reveal_secret(operation_id: uuid.UUID, caller: Acting) -> JSONResponse:
    """The new endpoint's secret, once, for operations no response revealed (scheduled ones).
    Scope: ``org:admin:write`` for an ``org_secret_rotation``, ``webhooks:write`` for any
    other kind."""
    return JSONResponse(await caller.run(_reveal, operation_id, caller.principal.scopes))
