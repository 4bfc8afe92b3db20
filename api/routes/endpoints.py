"""/v1/webhooks: endpoints and their secrets (docs/api.md). Parse, authorize, call, render."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from api.deps import Caller, authorize, body_doc, parse_id, read_json, require
from api.errors import responses
from api.isolation import sending_threads
from api.schemas import (
    CursorParam,
    Endpoint,
    EndpointCreate,
    EndpointList,
    EndpointUpdate,
    EndpointWithSecret,
    TestDeliveryOut,
    endpoint_json,
    list_json,
)
from models import endpoint as endpoints
from models import usecases
from models.errors import NotFound
from models.limits import start_test_delivery
from models.org import Scope
from workers.deliveries import attempt

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

Reader = Annotated[Caller, Depends(require(Scope.WEBHOOKS_READ))]
Writer = Annotated[Caller, Depends(require(Scope.WEBHOOKS_WRITE))]


# First: the busiest route, as routes are matched in order. It authorizes by a plain call
# rather than a dependency and takes its id as a string parsed afterwards (401 still comes
# before 422): FastAPI's dependency solving costs this read more than the read itself.
@router.get("/{endpoint_id}", response_model=Endpoint, responses=responses(401, 403, 404, 422))
async def get_endpoint(
    request: Request, endpoint_id: Annotated[str, Path(json_schema_extra={"format": "uuid"})]
) -> JSONResponse:
    """One endpoint. The secret is never shown here."""
    caller = await authorize(request, Scope.WEBHOOKS_READ)
    endpoint = await endpoints.read_endpoint(
        caller.reads, caller.principal.org_id, parse_id(endpoint_id, "endpoint_id")
    )
    return JSONResponse(endpoint_json(endpoint))


@router.post(
    "",
    status_code=201,
    response_model=EndpointWithSecret,
    responses=responses(401, 403, 409, 413, 422),
    openapi_extra=body_doc(EndpointCreate),
)
async def create_endpoint(request: Request, caller: Writer) -> JSONResponse:
    """Create an endpoint. Its secret is in this response and never again."""
    body = await read_json(request, EndpointCreate)
    created = await caller.run(
        endpoints.create_endpoint,
        url=body.url,
        events=body.events,
        description=body.description,
        api_version=body.api_version,
    )
    return JSONResponse(endpoint_json(created.endpoint, secret=created.secret), status_code=201)


@router.get("", response_model=EndpointList, responses=responses(401, 403, 422))
async def list_endpoints(
    caller: Reader,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    cursor: CursorParam = None,
) -> JSONResponse:
    """Live endpoints of the caller's organization, newest first."""
    page = await caller.run(endpoints.list_endpoints, limit=limit, cursor=cursor)
    return JSONResponse(
        list_json(
            [endpoint_json(item) for item in page.items], limit=limit, next_cursor=page.next_cursor
        )
    )


@router.patch(
    "/{endpoint_id}",
    response_model=Endpoint,
    responses=responses(401, 403, 404, 409, 413, 422),
    openapi_extra=body_doc(EndpointUpdate),
)
async def update_endpoint(endpoint_id: uuid.UUID, request: Request, caller: Writer) -> JSONResponse:
    """Change url, description (blank clears), events (replaces the set) or active. While a
    migration uses the endpoint, changing url or events is 409 CONFLICT."""
    body = await read_json(request, EndpointUpdate)
    changes = {field: getattr(body, field) for field in body.model_fields_set}
    endpoint = await caller.run(endpoints.update_endpoint, endpoint_id, changes)
    return JSONResponse(endpoint_json(endpoint))


@router.delete(
    "/{endpoint_id}",
    status_code=204,
    response_class=Response,
    responses=responses(401, 403, 404, 409, 422),
)
async def delete_endpoint(endpoint_id: uuid.UUID, caller: Writer) -> Response:
    """Soft delete: the endpoint stops receiving; its delivery history is kept."""
    await caller.run(usecases.delete_endpoint, endpoint_id)
    return Response(status_code=204)


@router.post(
    "/{endpoint_id}/rotate-secret",
    response_model=EndpointWithSecret,
    responses=responses(401, 403, 404, 409, 422),
)
async def rotate_secret(endpoint_id: uuid.UUID, caller: Writer) -> JSONResponse:
    """Replace the secret immediately, with no grace window. Shown once. 409 CONFLICT while a
    migration uses the endpoint."""
    rotated = await caller.run(endpoints.rotate_secret, endpoint_id)
    return JSONResponse(endpoint_json(rotated.endpoint, secret=rotated.secret))


@router.post(
    "/{endpoint_id}/test",
    response_model=TestDeliveryOut,
    responses=responses(401, 403, 404, 422, 429),
)
async def send_test(endpoint_id: uuid.UUID, caller: Writer) -> JSONResponse:
    """Send a ``webhook.test`` event now, signed like a real delivery, and report the outcome.

    At most ``ROTATOR_SYNC_TESTS_PER_ORG`` in flight per organization; beyond, 429."""
    settings = caller.db.settings
    # Sent on threads of its own, so that a slow receiver holds none of the threads every other
    # route needs (docs/operating.md, Isolation); all busy: 429 before anything is written.
    threads = sending_threads(settings.sync_test_threads)
    with threads.reserve(retry_after=settings.delivery_timeout_seconds) as thread:
        delivery = await caller.run(start_test_delivery, endpoint_id)
        sent = await thread.run(attempt, caller.db, delivery.id)
    if sent is None:  # the endpoint was deleted between the two steps
        raise NotFound()
    return JSONResponse(
        {
            "event_id": sent.event_id,
            "outcome": sent.outcome,
            "url": sent.url,
            "response_status": sent.response_status,
            "response_time_ms": sent.response_time_ms,
            "response_body_excerpt": sent.response_body_excerpt,
            "error": sent.error,
        }
    )
