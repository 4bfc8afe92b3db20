"""/v1/rotation-policies: scheduled periodic rotation (docs/api.md, "Rotation policies")."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from api.deps import Caller, body_doc, read_json, require
from api.errors import responses
from api.schemas import (
    CursorParam,
    Policy,
    PolicyCreate,
    PolicyList,
    PolicyUpdate,
    list_json,
    policy_json,
)
from models import policy as policies
from models.errors import Forbidden
from models.org import Scope

router = APIRouter(prefix="/v1/rotation-policies", tags=["rotation policies"])

Reader = Annotated[Caller, Depends(require(Scope.WEBHOOKS_READ))]
Writer = Annotated[Caller, Depends(require(Scope.WEBHOOKS_WRITE))]


def _require_admin_for_org_secret(caller: Caller, target: str) -> None:
    """Scheduling the organization secret's rotation is as privileged as rotating it."""
    if (
        target == policies.Target.ORG_SECRET
        and Scope.ORG_ADMIN_WRITE not in caller.principal.scopes
    ):
        raise Forbidden()


def _create(session: Session, org_id: uuid.UUID, fields: dict[str, Any]) -> dict[str, Any]:
    return policy_json(policies.create_policy(session, org_id, **fields))


@router.post(
    "",
    status_code=201,
    response_model=Policy,
    responses=responses(401, 403, 409, 413, 422),
    openapi_extra=body_doc(PolicyCreate),
)
async def create_policy(request: Request, caller: Writer) -> JSONResponse:
    """Rotate an endpoint (safe migrate or immediate) or the organization secret on a schedule."""
    body = await read_json(request, PolicyCreate)
    _require_admin_for_org_secret(caller, body.target)
    fields = body.model_dump(exclude_unset=True)
    if fields.get("strategy") is None:
        fields.pop("strategy", None)
    return JSONResponse(await caller.run(_create, fields), status_code=201)


@router.get("", response_model=PolicyList, responses=responses(401, 403, 422))
async def list_policies(
    caller: Reader,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    cursor: CursorParam = None,
) -> JSONResponse:
    """The organization's rotation policies, newest first."""
    page = await caller.run(policies.list_policies, limit=limit, cursor=cursor)
    return JSONResponse(
        list_json([policy_json(p) for p in page.items], limit=limit, next_cursor=page.next_cursor)
    )


def _get(session: Session, org_id: uuid.UUID, policy_id: uuid.UUID) -> dict[str, Any]:
    return policy_json(policies.get_policy(session, org_id, policy_id))


@router.get("/{policy_id}", response_model=Policy, responses=responses(401, 403, 404, 422))
async def get_policy(policy_id: uuid.UUID, caller: Reader) -> JSONResponse:
    """One rotation policy."""
    return JSONResponse(await caller.run(_get, policy_id))


def _update(
    session: Session, org_id: uuid.UUID, policy_id: uuid.UUID, changes: dict[str, Any], admin: bool
) -> dict[str, Any]:
    policy = policies.get_policy(session, org_id, policy_id)
    if policy.target == policies.Target.ORG_SECRET and not admin:
        raise Forbidden()
    return policy_json(policies.update_policy(session, org_id, policy_id, changes))


@router.patch(
    "/{policy_id}",
    response_model=Policy,
    responses=responses(401, 403, 404, 413, 422),
    openapi_extra=body_doc(PolicyUpdate),
)
async def update_policy(policy_id: uuid.UUID, request: Request, caller: Writer) -> JSONResponse:
    """Pause, resume, or change the interval, strategy, handoff or next run."""
    body = await read_json(request, PolicyUpdate)
    changes = {field: getattr(body, field) for field in body.model_fields_set}
    admin = Scope.ORG_ADMIN_WRITE in caller.principal.scopes
    return JSONResponse(await caller.run(_update, policy_id, changes, admin))


def _delete(session: Session, org_id: uuid.UUID, policy_id: uuid.UUID, admin: bool) -> None:
    policy = policies.get_policy(session, org_id, policy_id)
    if policy.target == policies.Target.ORG_SECRET and not admin:
        raise Forbidden()
    policies.delete_policy(session, org_id, policy_id)


@router.delete(
    "/{policy_id}",
    status_code=204,
    response_class=Response,
    responses=responses(401, 403, 404, 422),
)
async def delete_policy(policy_id: uuid.UUID, caller: Writer) -> Response:
    """Stop rotating; operations already started go on."""
    await caller.run(_delete, policy_id, Scope.ORG_ADMIN_WRITE in caller.principal.scopes)
    return Response(status_code=204)
