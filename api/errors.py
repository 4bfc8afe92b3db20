"""The error envelope, and the one set of handlers that renders every error in it."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from models.errors import DomainError

log = logging.getLogger("rotator.api")

_HTTP_CODES: dict[int, tuple[str, str]] = {
    400: ("BAD_REQUEST", "bad request"),
    401: ("UNAUTHORIZED", "authentication failed"),
    403: ("FORBIDDEN", "missing required scope"),
    404: ("NOT_FOUND", "not found"),
    405: ("METHOD_NOT_ALLOWED", "method not allowed"),
    406: ("NOT_ACCEPTABLE", "not acceptable"),
    409: ("CONFLICT", "conflict (LIMIT_EXCEEDED or CONFLICT)"),
    413: ("PAYLOAD_TOO_LARGE", "request body too large"),
    415: ("UNSUPPORTED_MEDIA_TYPE", "unsupported media type"),
    422: ("VALIDATION_FAILED", "validation failed"),
    429: ("RATE_LIMITED", "rate limit exceeded"),
    500: ("INTERNAL_ERROR", "internal error"),
    502: ("PROVIDER_UNAVAILABLE", "the remote provider did not answer"),
    503: ("SERVICE_UNAVAILABLE", "service unavailable"),
}


class ErrorBody(BaseModel):
    code: str
    message: str
    request_id: str
    details: dict[str, str] | None = None


class ErrorEnvelope(BaseModel):
    """Every non-2xx response has this shape."""

    success: bool = False
    error: ErrorBody


def request_id_of(request: Request) -> str:
    return str(getattr(request.state, "request_id", ""))


def envelope(
    status: int,
    code: str,
    message: str,
    request_id: str,
    *,
    details: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    error: dict[str, Any] = {"code": code, "message": message, "request_id": request_id}
    if details:
        error["details"] = dict(details)
    return JSONResponse(
        {"success": False, "error": error},
        status_code=status,
        headers={"X-Request-Id": request_id, **(headers or {})},
    )


def for_status(status: int, request_id: str, **kwargs: Any) -> JSONResponse:
    code, message = _HTTP_CODES.get(status, ("ERROR", "error"))
    return envelope(status, code, message, request_id, **kwargs)


def _field_of(loc: Sequence[Any]) -> str:
    parts = [str(part) for part in loc if part not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def validation_details(errors: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    details: dict[str, str] = {}
    for error in errors:
        field = _field_of(error.get("loc", ()))
        if error.get("type") == "json_invalid":
            field, message = "body", "malformed JSON"
        elif error.get("type") == "extra_forbidden":
            message = "unknown field"
        elif error.get("type") == "uuid_parsing":
            message = "must be a UUID"
        else:
            message = str(error.get("msg", "invalid"))
        details.setdefault(field, message)
    return details


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    exc = cast(DomainError, exc)
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return envelope(
        exc.status,
        exc.code,
        exc.message,
        request_id_of(request),
        details=exc.details,
        headers=headers,
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    exc = cast(StarletteHTTPException, exc)
    headers = {k: v for k, v in (exc.headers or {}).items() if k.lower() == "allow"}
    if exc.status_code == 405:
        # Starlette names only the first matching route's methods; Allow must list them all.
        allowed = [
            method
            for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
            if any(
                route.matches({**request.scope, "method": method})[0] == Match.FULL
                for route in request.app.router.routes
            )
        ]
        if allowed:
            headers = {"Allow": ", ".join(allowed)}
    return for_status(exc.status_code, request_id_of(request), headers=headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    exc = cast(RequestValidationError, exc)
    return for_status(422, request_id_of(request), details=validation_details(exc.errors()))


def install(app: FastAPI) -> None:
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries for the error statuses a route can return."""
    return {
        status: {"model": ErrorEnvelope, "description": _HTTP_CODES[status][1]}
        for status in statuses
    }
