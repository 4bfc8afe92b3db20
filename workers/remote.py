"""Calls to a remote provider's AgentMessage-compatible API (docs/api.md, "Remote providers").

Every call goes through the same destination rules as a delivery (``workers.http``), ends
within ``ROTATOR_PROVIDER_TIMEOUT_SECONDS`` from connect to last byte, and never raises: a
failure is an :class:`Answer` without a status. Each call is logged (method, path, status,
time) without its key, which travels only in the Authorization header.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from models.provider import Account
from models.remote import Call, RemoteCall
from rotator.settings import Settings
from workers.http import (
    describe_failure,
    guarded_client,
    parse_retry_after,
    printable_text,
    total_deadline,
)

log = logging.getLogger("rotator.providers")

MAX_RESPONSE_BYTES = 1_048_576
# Listing a whole remote account (to find an endpoint whose creation's answer was lost) reads
# at most this many pages of 100.
LIST_PAGES_MAX = 50


@dataclass(frozen=True)
class Answer:
    """What the remote answered: its status and JSON body, or why there is none."""

    status: int | None
    body: Any = None
    error: str | None = None  # no usable answer: a timeout, a refused connection, not JSON
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300 and self.error is None

    @property
    def unauthorized(self) -> bool:
        return self.status in (401, 403)

    @property
    def transient(self) -> bool:
        """Worth trying again later: no answer, 408, 429, or a 5xx."""
        if self.status is None:
            return True
        return self.status in (408, 429) or self.status >= 500

    def data(self) -> dict[str, Any]:
        """The AgentMessage body's object (``data`` when enveloped), or {}."""
        if not isinstance(self.body, dict):
            return {}
        inner = self.body.get("data", self.body)
        return inner if isinstance(inner, dict) else self.body

    def items(self) -> list[dict[str, Any]]:
        """A list response's items."""
        data = self.body.get("data") if isinstance(self.body, dict) else None
        return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []

    def next_cursor(self) -> str | None:
        meta = self.body.get("meta") if isinstance(self.body, dict) else None
        cursor = meta.get("next_cursor") if isinstance(meta, dict) else None
        return cursor if isinstance(cursor, str) and cursor else None

    def message(self) -> str:
        """The remote's own error message when it sent one, else what went wrong."""
        if self.error is not None:
            return self.error
        error = self.body.get("error") if isinstance(self.body, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            said = printable_text(error["message"][:300].encode())
            return f"remote answered {self.status}: {said}"
        return f"remote answered {self.status}"


class Remote:
    """One remote account's API, over one keep-alive client."""

    def __init__(self, settings: Settings, account: Account):
        self.account = account
        self.timeout_s = settings.provider_timeout_seconds
        self._client = guarded_client(settings, timeout_s=self.timeout_s)

    # --- the calls Rotator makes ---

    def list_endpoints(self, *, limit: int = 100, cursor: str | None = None) -> Answer:
        params: dict[str, str | int] = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        return self.call("GET", "/v1/webhooks", params=params)

    def all_endpoints(self) -> Answer:
        """Every endpoint of the account, as one list answer (or the first failed page).

        No page starts once one call's timeout has passed, so a listing ends within two
        (the lease ``models.remote`` takes on the operation)."""
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        ends = time.monotonic() + self.timeout_s
        for _ in range(LIST_PAGES_MAX):
            if time.monotonic() >= ends:
                return Answer(status=None, error="listing the account took too long")
            page = self.list_endpoints(cursor=cursor)
            if not page.ok:
                return page
            items += page.items()
            cursor = page.next_cursor()
            if cursor is None:
                return Answer(status=200, body={"data": items, "meta": {"next_cursor": None}})
        return Answer(status=None, error=f"more than {LIST_PAGES_MAX} pages of endpoints")

    def get_endpoint(self, remote_id: str) -> Answer:
        return self.call("GET", f"/v1/webhooks/{remote_id}")

    def create_endpoint(self, *, url: str, events: list[str], description: str) -> Answer:
        body: dict[str, Any] = {"url": url, "events": events}
        if description:
            body["description"] = description
        return self.call("POST", "/v1/webhooks", body=body)

    def rotate_secret(self, remote_id: str) -> Answer:
        return self.call("POST", f"/v1/webhooks/{remote_id}/rotate-secret")

    def test(self, remote_id: str) -> Answer:
        return self.call("POST", f"/v1/webhooks/{remote_id}/test")

    def delete_endpoint(self, remote_id: str) -> Answer:
        return self.call("DELETE", f"/v1/webhooks/{remote_id}")

    # --- plumbing ---

    def call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        body: Any = None,
    ) -> Answer:
        start = time.perf_counter()
        with total_deadline(self.timeout_s):
            answer = self._call(method, path, params, body)
        log.info(
            "provider call",
            extra={
                "provider_id": str(self.account.provider_id or ""),
                "method": method,
                "path": path,
                "status": answer.status,
                "error": answer.error,
                "elapsed_ms": int((time.perf_counter() - start) * 1000),
            },
        )
        return answer

    def _call(
        self, method: str, path: str, params: Mapping[str, str | int] | None, body: Any
    ) -> Answer:
        headers = {"Authorization": f"Bearer {self.account.api_key}", "Accept": "application/json"}
        content = None
        if body is not None:
            content = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            request = self._client.build_request(
                method,
                self.account.base_url + path,
                params=params,
                content=content,
                headers=headers,
            )
            response = self._client.send(request, stream=True)
        except Exception as exc:
            return Answer(status=None, error=describe_failure(exc))
        try:
            status = response.status_code
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if 300 <= status < 400:
                return Answer(status=status, error="redirect not followed")
            raw = bytearray()
            try:
                for chunk in response.iter_raw():
                    raw += chunk
                    if len(raw) > MAX_RESPONSE_BYTES:
                        return Answer(status=status, error="response too large")
            except Exception as exc:
                return Answer(status=None, error=f"{describe_failure(exc)} while reading body")
        finally:
            response.close()
        parsed: Any = None
        if raw:
            try:
                parsed = json.loads(raw)
            except ValueError:
                if 200 <= status < 300:
                    return Answer(status=status, error="response is not JSON")
        return Answer(status=status, body=parsed, retry_after_s=retry_after)

    def close(self) -> None:
        self._client.close()


def perform(settings: Settings, call: RemoteCall) -> Answer:
    """Make the call a remote migrate's step asked for (models/remote.py)."""
    with closing(Remote(settings, call.account)) as remote:
        if call.call in (Call.SNAPSHOT, Call.FIND):
            return remote.all_endpoints()
        if call.call == Call.CREATE:
            return remote.create_endpoint(
                url=call.url, events=list(call.events), description=call.description
            )
        remote_id = call.remote_id or ""
        if call.call == Call.LOOKUP:
            return remote.get_endpoint(remote_id)
        if call.call == Call.ROTATE:
            return remote.rotate_secret(remote_id)
        if call.call == Call.TEST:
            return remote.test(remote_id)
        return remote.delete_endpoint(remote_id)  # delete_old, delete_new


def check_account(settings: Settings, account: Account) -> dict[str, str] | None:
    """Whether the remote accepts the key: None, or the 422 details saying what is wrong
    (``api_key`` when the remote refused it, ``base_url`` for any other failure)."""
    with closing(Remote(settings, account)) as remote:
        answer = remote.list_endpoints(limit=1)
    if answer.ok and isinstance(answer.body, dict):
        return None
    if answer.unauthorized:
        return {"api_key": f"the provider refused this key ({answer.status})"}
    if answer.ok:
        return {"base_url": "does not answer like an AgentMessage-compatible API"}
    return {"base_url": f"the provider did not answer: {answer.message()}"}
