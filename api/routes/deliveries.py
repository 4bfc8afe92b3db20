"""/v1/webhooks/deliveries: the attempt log, and replay (docs/api.md, "Delivery log and replay")."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from api.deps import Caller, require
from api.errors import responses
from api.schemas import (
    CursorParam,
    DeliveryAttemptList,
    DeliveryAttemptOut,
    EventTypeParam,
    OutcomeParam,
    ReplayOut,
    TimeParam,
    attempt_json,
    list_json,
)
from models import delivery_log
from models.clock import rfc3339
from models.errors import ValidationFailed
from models.org import Scope
from workers.deliveries import enqueue as enqueue_deliveries

router = APIRouter(prefix="/v1/webhooks/deliveries", tags=["deliveries"])

Reader = Annotated[Caller, Depends(require(Scope.WEBHOOKS_READ))]
Writer = Annotated[Caller, Depends(require(Scope.WEBHOOKS_WRITE))]


def _aware(field: str, value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise ValidationFailed({field: "must be an RFC 3339 time with a UTC offset"})
    return value


@router.get("", response_model=DeliveryAttemptList, responses=responses(401, 403, 422))
async def list_deliveries(
    caller: Reader,
    endpoint_id: uuid.UUID | None = None,
    event_type: EventTypeParam = None,
    outcome: OutcomeParam = None,
    since: TimeParam = None,
    until: TimeParam = None,
    http_status_min: Annotated[int | None, Query(ge=100, le=599)] = None,
    http_status_max: Annotated[int | None, Query(ge=100, le=599)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: CursorParam = None,
) -> JSONResponse:
    """One row per delivery attempt, newest first."""
    filters = delivery_log.AttemptFilter(
        endpoint_id=endpoint_id,
        event_type=event_type,
        outcome=outcome,
        since=_aware("since", since),
        until=_aware("until", until),
        http_status_min=http_status_min,
        http_status_max=http_status_max,
    )
    filters.validate()
    page = await caller.run(delivery_log.list_attempts, filters=filters, limit=limit, cursor=cursor)
    return JSONResponse(
        list_json([attempt_json(a) for a in page.items], limit=limit, next_cursor=page.next_cursor)
    )


@router.get(
    "/{delivery_id}", response_model=DeliveryAttemptOut, responses=responses(401, 403, 404, 422)
)
async def get_delivery(delivery_id: uuid.UUID, caller: Reader) -> JSONResponse:
    """One delivery attempt."""
    attempt = await caller.run(delivery_log.get_attempt, delivery_id)
    return JSONResponse(attempt_json(attempt))


def _replay(session: Session, org_id: uuid.UUID, attempt_id: uuid.UUID) -> dict[str, Any]:
    replayed = delivery_log.replay(session, org_id, attempt_id)
    enqueue_deliveries(session, [replayed.delivery.id])
    return {
        "delivery_id": str(replayed.source.id),
        "endpoint_id": str(replayed.source.endpoint_id),
        "event_type": replayed.event.type,
        "new_event_id": replayed.event.id,
        "enqueued_at": rfc3339(replayed.event.created_at),
    }


@router.post(
    "/{delivery_id}/replay",
    status_code=202,
    response_model=ReplayOut,
    responses=responses(401, 403, 404, 422, 429),
)
async def replay_delivery(delivery_id: uuid.UUID, caller: Writer) -> JSONResponse:
    """Send the attempt's event data again, under a fresh event id. 10 per minute."""
    return JSONResponse(await caller.run(_replay, delivery_id), status_code=202)
