"""Authentication, scopes, the unit of work, and request bodies parsed after auth.

A route runs its domain call through ``Caller.run``: one worker-thread hop that opens a
session, checks the key is still live, calls the domain function, and commits (or rolls back).
Hot reads (``Caller.reads``) stay on the event loop instead (``models.reads``).

Authentication is a dependency, so it is settled before any parameter or body is validated: a
caller without a valid key learns nothing but 401. It reads on the event loop and remembers a
key for ``ROTATOR_AUTH_CACHE_SECONDS``: a revoked key is refused at once by anything that
writes, and by reads once that time has passed.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, Concatenate, ParamSpec, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.errors import validation_details
from models.db import Database, get_database
from models.errors import Forbidden, Unauthorized, ValidationFailed
from models.org import Principal, PrincipalCache, Scope, authenticate, ensure_live
from models.reads import Reads
from rotator import logs

T = TypeVar("T")
P = ParamSpec("P")
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Caller:
    principal: Principal
    db: Database

    async def run(
        self,
        fn: Callable[Concatenate[Session, uuid.UUID, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """``fn(session, org_id, *args, **kwargs)`` in one unit of work, off the event loop.

        Typed with ``ParamSpec``: mypy checks every route's call into the domain."""

        def unit_of_work() -> T:
            with self.db.session() as session:
                ensure_live(session, self.principal)
                return fn(session, self.principal.org_id, *args, **kwargs)

        return await run_in_threadpool(unit_of_work)

    @property
    def reads(self) -> Reads:
        return self.db.reads


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized()
    return token.strip()


@cache
def _principals(ttl_seconds: float) -> PrincipalCache:
    return PrincipalCache(ttl_seconds)


async def authorize(request: Request, scope: Scope | None) -> Caller:
    """The caller, authenticated and holding ``scope``; else 401, then 403.

    ``None``: any valid key. The domain call then checks the scope the resource needs, after
    its own 404 (the scope an operation needs depends on its kind).
    """
    token = _bearer(request)
    db = get_database()
    principal = await authenticate(db.reads, token, _principals(db.settings.auth_cache_seconds))
    org_id = str(principal.org_id)
    request.state.org_id = org_id  # for the middleware's request log line
    logs.set_context(org_id=org_id)  # for every other line of this request
    if scope is not None and scope not in principal.scopes:
        raise Forbidden()
    return Caller(principal=principal, db=db)


def parse_id(value: str, field: str) -> uuid.UUID:
    """A path id taken as a string (so that it is checked after ``authorize``), as a UUID."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ValidationFailed({field: "must be a UUID"}) from None


@cache
def require(scope: Scope | None) -> Callable[..., Any]:
    """A dependency: the caller, authenticated and holding ``scope`` (memoised per scope;
    ``None``: authenticated only, see ``authorize``)."""

    async def dependency(request: Request) -> Caller:
        return await authorize(request, scope)

    name = "authenticated" if scope is None else scope.value.replace(":", "_")
    dependency.__name__ = f"require_{name}"
    return dependency


async def read_json(request: Request, model: type[M], *, optional: bool = False) -> M:
    """Parse the body into ``model`` (strict, unknown fields refused) with envelope errors.

    With ``optional``, an empty body means ``{}``.
    """
    raw = await request.body()
    if not raw.strip():
        if optional:
            return model.model_validate({})
        raise ValidationFailed({"body": "a JSON object is required"})
    try:
        data = json.loads(raw)
        json.dumps(data, ensure_ascii=False).encode()  # refuses lone surrogates
    except (ValueError, UnicodeError, RecursionError):
        raise ValidationFailed({"body": "malformed JSON"}) from None
    if not isinstance(data, dict):
        raise ValidationFailed({"body": "must be a JSON object"})
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise ValidationFailed(
            validation_details(exc.errors(include_url=False, include_input=False))
        ) from None


def body_doc(model: type[BaseModel], *, required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its body with ``read_json``."""
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


__all__ = ["Caller", "Session", "authorize", "body_doc", "parse_id", "read_json", "require"]
