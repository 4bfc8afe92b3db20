"""/v1/providers: accounts at other AgentMessage-compatible services, their endpoints, and
remote migrates (docs/api.md, "Remote providers").

Calls to a provider last as long as it takes to answer, so they run where synchronous test
deliveries do (``api.isolation``): never on the threads every other route's unit of work uses.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import closing
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from api.deps import Caller, body_doc, read_json, require
from api.errors import responses
from api.isolation import sending_threads
from api.schemas import (
    CursorParam,
    IdempotencyKeyHeader,
    MigrateRequest,
    OperationOut,
    ProviderCreate,
    ProviderList,
    ProviderOut,
    ProviderUpdate,
    RemoteEndpointList,
    list_json,
    operation_json,
    provider_json,
)
from models import idempotency, remote
from models import policy as policies
from models import provider as providers
from models.errors import ProviderUnavailable, ValidationFailed
from models.org import Scope
from models.provider import Account
from workers.enqueue import send_after_commit
from workers.names import TaskName
from workers.remote import Answer, Remote, check_account

router = APIRouter(tags=["providers"])

Reader = Annotated[Caller, Depends(require(Scope.WEBHOOKS_READ))]
Writer = Annotated[Caller, Depends(require(Scope.WEBHOOKS_WRITE))]
Admin = Annotated[Caller, Depends(require(Scope.ORG_ADMIN_WRITE))]

T = TypeVar("T")


async def _at_provider(caller: Caller, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a thread kept for slow outbound calls (429 when all are busy)."""
    settings = caller.db.settings
    threads = sending_threads(settings.sync_test_threads)
    with threads.reserve(retry_after=settings.provider_timeout_seconds) as thread:
        return await thread.run(fn, *args)


async def _check_key(
    caller: Caller, provider_id: uuid.UUID | None, base_url: str, api_key: str
) -> None:
    account = Account(
        provider_id=provider_id, base_url=providers.normalized(base_url), api_key=api_key
    )
    problems = await _at_provider(caller, check_account, caller.db.settings, account)
    if problems:
        raise ValidationFailed(problems)


@router.post(
    "/v1/providers",
    status_code=201,
    response_model=ProviderOut,
    responses=responses(401, 403, 413, 422, 429),
    openapi_extra=body_doc(ProviderCreate),
)
async def create_provider(request: Request, caller: Admin) -> JSONResponse:
    """Register an account at another AgentMessage-compatible service. The key is tried there
    (``GET /v1/webhooks?limit=1``) before it is stored, encrypted; it is never returned."""
    body = await read_json(request, ProviderCreate)
    values = body.model_dump()
    providers.validate(caller.db.settings, values)  # refused before any call out
    await _check_key(caller, None, body.base_url, body.api_key)

    def create(session: Session, org_id: uuid.UUID) -> dict[str, Any]:
        return provider_json(providers.create(session, org_id, **values))

    return JSONResponse(await caller.run(create), status_code=201)


def _list(session: Session, org_id: uuid.UUID, limit: int, cursor: str | None) -> dict[str, Any]:
    page = providers.list_providers(session, org_id, limit=limit, cursor=cursor)
    return list_json(
        [provider_json(item) for item in page.items], limit=limit, next_cursor=page.next_cursor
    )


@router.get("/v1/providers", response_model=ProviderList, responses=responses(401, 403, 422))
async def list_providers(
    caller: Reader,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    cursor: CursorParam = None,
) -> JSONResponse:
    """The organization's providers, newest first."""
    return JSONResponse(await caller.run(_list, limit, cursor))


def _get(session: Session, org_id: uuid.UUID, provider_id: uuid.UUID) -> dict[str, Any]:
    return provider_json(providers.get(session, org_id, provider_id))


@router.get(
    "/v1/providers/{provider_id}",
    response_model=ProviderOut,
    responses=responses(401, 403, 404, 422),
)
async def get_provider(provider_id: uuid.UUID, caller: Reader) -> JSONResponse:
    return JSONResponse(await caller.run(_get, provider_id))


@router.patch(
    "/v1/providers/{provider_id}",
    response_model=ProviderOut,
    responses=responses(401, 403, 404, 413, 422, 429),
    openapi_extra=body_doc(ProviderUpdate),
)
async def update_provider(provider_id: uuid.UUID, request: Request, caller: Admin) -> JSONResponse:
    """Rename, or replace the key: a new key is tried at the provider first."""
    body = await read_json(request, ProviderUpdate)
    changes = body.model_dump(exclude_unset=True)
    providers.validate(caller.db.settings, changes)
    if "api_key" in changes:
        current = await caller.run(_get, provider_id)
        await _check_key(caller, provider_id, current["base_url"], changes["api_key"])

    def update(session: Session, org_id: uuid.UUID) -> dict[str, Any]:
        return provider_json(providers.update(session, org_id, provider_id, **changes))

    return JSONResponse(await caller.run(update))


def _delete(session: Session, org_id: uuid.UUID, provider_id: uuid.UUID) -> None:
    provider = remote.delete_provider(session, org_id, provider_id)
    policies.end_policies_for_provider(session, provider.id)


@router.delete(
    "/v1/providers/{provider_id}",
    status_code=204,
    response_class=Response,
    responses=responses(401, 403, 404, 409, 422),
)
async def delete_provider(provider_id: uuid.UUID, caller: Admin) -> Response:
    """Forget the account and its key (its policies end too); 409 while a remote migration
    uses it. Nothing changes at the provider."""
    await caller.run(_delete, provider_id)
    return Response(status_code=204)


def _list_remote(account: Account, settings: Any, limit: int, cursor: str | None) -> Answer:
    with closing(Remote(settings, account)) as remote_api:
        return remote_api.list_endpoints(limit=limit, cursor=cursor)


@router.get(
    "/v1/providers/{provider_id}/webhooks",
    response_model=RemoteEndpointList,
    responses=responses(401, 403, 404, 422, 429, 502),
)
async def list_remote_endpoints(
    provider_id: uuid.UUID,
    caller: Reader,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    cursor: Annotated[str | None, Query(max_length=1024)] = None,
) -> JSONResponse:
    """The provider's endpoints as it lists them (``limit`` and ``cursor`` passed through);
    502 ``PROVIDER_UNAVAILABLE`` when it cannot."""
    account = await caller.run(providers.account, provider_id)
    answer = await _at_provider(caller, _list_remote, account, caller.db.settings, limit, cursor)
    if not answer.ok or not isinstance(answer.body, dict):
        raise ProviderUnavailable(f"the provider could not list its endpoints: {answer.message()}")
    # Whatever else a provider puts in its objects, a secret is not passed on.
    items = [{k: v for k, v in item.items() if k != "secret"} for item in answer.items()]
    return JSONResponse(list_json(items, limit=limit, next_cursor=answer.next_cursor()))


def _migrate(
    session: Session,
    org_id: uuid.UUID,
    provider_id: uuid.UUID,
    remote_id: str,
    body: MigrateRequest,
    key: str | None,
    api_key_id: uuid.UUID,
) -> dict[str, Any]:
    fingerprint = idempotency.request_fingerprint(
        f"{provider_id}/{remote_id}", body.model_dump(exclude_unset=True)
    )

    def start() -> dict[str, Any]:
        operation = remote.start(
            session,
            org_id,
            provider_id,
            remote_id,
            url=body.url,
            events=body.events,
            description=body.description,
            deadline_seconds=body.deadline_seconds,
        )
        send_after_commit(session, TaskName.OPERATION_ADVANCE, operation.id)
        return operation_json(operation)

    return idempotency.once(session, org_id, key, fingerprint, start, api_key_id=api_key_id)


@router.post(
    "/v1/providers/{provider_id}/webhooks/{remote_endpoint_id}/migrate",
    status_code=202,
    response_model=OperationOut,
    responses=responses(401, 403, 404, 409, 413, 422),
    openapi_extra=body_doc(MigrateRequest, required=False),
)
async def migrate_remote_endpoint(
    provider_id: uuid.UUID,
    remote_endpoint_id: str,
    request: Request,
    caller: Writer,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JSONResponse:
    """Safe-migrate an endpoint at the provider (``remote_migrate``): a new endpoint there,
    tested there until its receiver accepts it, then the old one deleted there. The provider
    mints the new secret: ``POST /v1/operations/{id}/reveal-secret`` shows it once, as soon as
    the new endpoint exists."""
    body = await read_json(request, MigrateRequest, optional=True)
    if idempotency_key is not None:
        idempotency.check_key(idempotency_key)
    response = await caller.run(
        _migrate, provider_id, remote_endpoint_id, body, idempotency_key, caller.principal.key_id
    )
    return JSONResponse(response, status_code=202)
