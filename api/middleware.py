"""Pure ASGI middleware (no per-request task switching): request ids, body cap, last-resort 500.

Every response gets ``X-Request-Id`` (a ULID), errors included; a request body over the cap
is refused with 413 before any route sees it; an unhandled exception becomes a 500 envelope
that names nothing internal.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import for_status
from models.ids import new_request_id
from rotator import logs

log = logging.getLogger("rotator.api")


class _BodyTooLarge(Exception):
    pass


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        tokens = logs.set_context(request_id=request_id, org_id=None)
        began = time.perf_counter()
        id_header = (b"x-request-id", request_id.encode())
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = [h for h in message.get("headers", ()) if h[0].lower() != b"x-request-id"]
                headers.append(id_header)
                message["headers"] = headers
            await send(message)

        received = 0

        async def capped_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge
            return message

        try:
            declared = _content_length(scope)
            if declared is not None and declared > self.max_body_bytes:
                await for_status(413, request_id)(scope, receive, send_with_id)
                return
            try:
                await self.app(scope, capped_receive, send_with_id)
            except _BodyTooLarge:
                if not started:
                    await for_status(413, request_id)(scope, receive, send_with_id)
            except Exception:
                log.exception("unhandled error")
                if not started:
                    await for_status(500, request_id)(scope, receive, send_with_id)
        finally:
            # One line per request: ids and numbers only, never headers, query or body.
            log.info(
                "http request",
                extra={
                    "method": scope.get("method"),
                    "path": scope.get("path"),
                    "status": status,
                    "duration_ms": round((time.perf_counter() - began) * 1000, 1),
                    **({"org_id": state["org_id"]} if state.get("org_id") else {}),
                },
            )
            logs.reset_context(tokens)


def _content_length(scope: Mapping[str, Any]) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
