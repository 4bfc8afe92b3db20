"""/v1/events: the platform publishes an event; Rotator fans it out (Rotator's own route)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from api.deps import Caller, body_doc, read_json, require
from api.errors import responses
from api.schemas import EventPublish, PublishedEvent
from models import delivery as deliveries
from models.clock import rfc3339
from models.org import Scope
from workers.deliveries import enqueue as enqueue_deliveries

router = APIRouter(prefix="/v1/events", tags=["events"])

Publisher = Annotated[Caller, Depends(require(Scope.EVENTS_WRITE))]


def _publish(
    session: Session, org_id: uuid.UUID, event_type: str, data: dict[str, Any]
) -> dict[str, Any]:
    event, created = deliveries.publish(session, org_id, event_type, data)
    enqueue_deliveries(session, [delivery.id for delivery in created])
    return {
        "id": event.id,
        "type": event.type,
        "created_at": rfc3339(event.created_at),
        "deliveries": [
            {"id": str(item.id), "endpoint_id": str(item.endpoint_id)} for item in created
        ],
    }


@router.post(
    "",
    status_code=202,
    response_model=PublishedEvent,
    responses=responses(401, 403, 413, 422),
    openapi_extra=body_doc(EventPublish),
)
async def publish_event(request: Request, caller: Publisher) -> JSONResponse:
    """Publish an event: one delivery per active endpoint subscribed to its type."""
    body = await read_json(request, EventPublish)
    published = await caller.run(_publish, body.type, body.data)
    return JSONResponse(published, status_code=202)
