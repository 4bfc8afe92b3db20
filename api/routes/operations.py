"""Safe migrate and the operations API operators watch (CONTRACT §4–§5)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.orm import Session

from api.deps import Caller, body_doc, read_json, require
from api.errors import responses
from api.schemas import (
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
from models import idempotency
from models import operation as operations
from models.endpoint import get_endpoint
from models.errors import NotFound, ValidationFailed
from models.org import Scope
from workers.enqueue import send_after_commit
from workers.names import TaskName

router = APIRouter(tags=["operations"])

Reader = Annotated[Caller, Depends(require(Scope.WEBHOOKS_READ))]
Writer = Annotated[Caller, Depends(require(Scope.WEBHOOKS_WRITE))]

SSE_POLL_S = 0.5
SSE_KEEPALIVE_S = 15.0


def _migrate(
    session: Session,
    org_id: uuid.UUID,
    endpoint_id: uuid.UUID,
    body: MigrateRequest,
    key: str | None,
) -> dict[str, Any]:
    fingerprint = idempotency.request_fingerprint(
        str(endpoint_id), body.model_dump(exclude_unset=True)
    )
    try:
        get_endpoint(session, org_id, endpoint_id, for_update=True)  # serialise per endpoint
    except NotFound:
        # Deleted since the first request (its own migration may have finished): the first
        # response still stands for this key and body; anything else stays 404.
        if key is not None:
            try:
                stored = idempotency.recall(session, org_id, key, fingerprint)
            except ValidationFailed:
                stored = None
            if stored is not None:
                return stored
        raise
    if key is not None:
        stored = idempotency.recall(session, org_id, key, fingerprint)
        if stored is not None:
            return stored
    started = operations.start_migration(
        session,
        org_id,
        endpoint_id,
        url=body.url,
        events=body.events,
        description=body.description,
        deadline_seconds=body.deadline_seconds,
    )
    response = {
        **operation_json(started.operation),
        "secret": started.secret,
        "secret_displayed_once": True,
    }
    if key is not None:
        idempotency.remember(session, org_id, key, fingerprint, response)
    send_after_commit(session, TaskName.OPERATION_ADVANCE, started.operation.id)
    return response


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
    response = await caller.run(_migrate, endpoint_id, body, idempotency_key)
    return JSONResponse(response, status_code=202)


@router.get("/v1/operations", response_model=OperationList, responses=responses(401, 403, 422))
async def list_operations(
    caller: Reader,
    state: OperationStateParam = None,
    kind: OperationKindParam = None,
    endpoint_id: uuid.UUID | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    cursor: CursorParam = None,
) -> JSONResponse:
    """Operations of the caller's organization, newest first."""
    page = await caller.run(
        operations.list_operations,
        state=state,
        kind=kind,
        endpoint_id=endpoint_id,
        limit=limit,
        cursor=cursor,
    )
    return JSONResponse(
        list_json(
            [operation_json(item) for item in page.items], limit=limit, next_cursor=page.next_cursor
        )
    )


def _get(session: Session, org_id: uuid.UUID, operation_id: uuid.UUID) -> dict[str, Any]:
    return operation_json(operations.get_operation(session, org_id, operation_id))


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
        **responses(401, 403, 404, 422),
    },
)
async def operation_events(
    operation_id: uuid.UUID, request: Request, caller: Reader
) -> StreamingResponse:
    """Server-Sent Events: the operation as it changes (event ``operation``), until it ends."""
    first = await caller.run(_get, operation_id)  # 404 before the stream starts

    async def stream() -> AsyncIterator[str]:
        current: dict[str, Any] | None = first
        last: dict[str, Any] | None = None
        sequence = 0
        quiet = 0.0
        while True:
            if current != last:
                sequence += 1
                yield f"event: operation\nid: {sequence}\ndata: {json.dumps(current)}\n\n"
                last, quiet = current, 0.0
                if current is not None and current["finished_at"] is not None:
                    return
            elif quiet >= SSE_KEEPALIVE_S:
                yield ": keep-alive\n\n"
                quiet = 0.0
            if await request.is_disconnected():
                return
            await asyncio.sleep(SSE_POLL_S)
            quiet += SSE_POLL_S
            current = await caller.run(_get, operation_id)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _cancel(session: Session, org_id: uuid.UUID, operation_id: uuid.UUID) -> dict[str, Any]:
    operation = operations.request_cancel(session, org_id, operation_id)
    send_after_commit(session, TaskName.OPERATION_ADVANCE, operation.id)
    return operation_json(operation)


@router.post(
    "/v1/operations/{operation_id}/cancel",
    status_code=202,
    response_model=OperationOut,
    responses=responses(401, 403, 404, 409, 422),
)
async def cancel_operation(operation_id: uuid.UUID, caller: Writer) -> JSONResponse:
    """Roll back: the new endpoint is deleted, the old one stays. 409 once the old endpoint is
    deleted or the operation has ended."""
    return JSONResponse(await caller.run(_cancel, operation_id), status_code=202)


def _reveal(session: Session, org_id: uuid.UUID, operation_id: uuid.UUID) -> dict[str, Any]:
    operation, secret = operations.reveal_secret(session, org_id, operation_id)
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
async def reveal_secret(operation_id: uuid.UUID, caller: Writer) -> JSONResponse:
    """The new endpoint's secret, once, for operations no response revealed (scheduled ones)."""
    return JSONResponse(await caller.run(_reveal, operation_id))
