"""Webhook endpoints and their signing secrets (docs/api.md, "Endpoints").

An endpoint's secret is 32 random bytes, shown base64-encoded exactly once (in the create and
rotate responses) and otherwise kept only encrypted at rest.
"""

from __future__ import annotations

import base64
import dataclasses
import re
import secrets
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from functools import cache
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import (
    JSON,
    Boolean,
    ForeignKey,
    Index,
    LargeBinary,
    Select,
    String,
    bindparam,
    func,
    select,
    text,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from models import clock
from models.base import Base, IdMixin, UTCDateTime
from models.db import box_of, settings_of
from models.errors import LimitExceeded, NotFound, raise_if_any
from models.events import SUBSCRIBABLE_EVENT_TYPES, SUPPORTED_API_VERSIONS, SYSTEM_EVENT_TYPES
from models.ids import new_id
from models.operation import ensure_idle, forget_endpoint_secret
from models.org import lock_org
from models.pagination import Page, paginate
from models.reads import Query, Reads

MAX_EVENTS = 50
MAX_DESCRIPTION = 200
MAX_URL = 2048
# What an endpoint url may be, as the published schema states it (api/schemas.py): printable
# ASCII (non-ASCII is percent-encoded, hosts in punycode), a DNS name or IPv4 host, an optional
# port in 0-65535, then path, query or fragment. No credentials, no IPv6 literal.
URL_HOST_PORT_REST = (
    r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?"
    r"(?::(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4}))?"
    r"(?:[/?#][!-~]*)?"
)
URL_PATTERN = f"^https://{URL_HOST_PORT_REST}$"
_URL = {
    False: re.compile(f"https://{URL_HOST_PORT_REST}"),
    True: re.compile(f"https?://{URL_HOST_PORT_REST}"),
}
SECRET_BYTES = 32


class WebhookEndpoint(IdMixin, Base):
    __tablename__ = "webhook_endpoints"
    __table_args__ = (
        Index("ix_webhook_endpoints_org_created", "org_id", "created_at", "id"),
        # Counting live endpoints (the cap) must not read an organization's whole history.
        Index(
            "ix_webhook_endpoints_org_live",
            "org_id",
            postgresql_where=text("deleted_at IS NULL"),
            sqlite_where=text("deleted_at IS NULL"),
        ),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id"))
    url: Mapped[str] = mapped_column(String(MAX_URL))
    description: Mapped[str] = mapped_column(String(MAX_DESCRIPTION), default="")
    events: Mapped[list[str]] = mapped_column(JSON)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    api_version: Mapped[str] = mapped_column(String(16))
    secret_ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=clock.now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=clock.now)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


@dataclass(frozen=True)
class WithSecret:
    """An endpoint together with the secret a response shows once."""

    endpoint: WebhookEndpoint
    secret: str = dataclasses.field(repr=False)  # logging or printing it must not show it


def new_secret() -> str:
    return base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_context(endpoint_id: uuid.UUID) -> str:
    return f"webhook_endpoint.secret:{endpoint_id}"


def seal_secret(session: Session, endpoint: WebhookEndpoint, secret: str) -> None:
    endpoint.secret_ciphertext = box_of(session).encrypt(
        base64.b64decode(secret), context=secret_context(endpoint.id)
    )


def signing_key(session: Session, endpoint: WebhookEndpoint) -> bytes:
    """The endpoint's HMAC key (the decoded secret bytes), decrypted for signing."""
    return decrypt_secret(session, endpoint.id, endpoint.secret_ciphertext)


def decrypt_secret(session: Session, endpoint_id: uuid.UUID, ciphertext: bytes) -> bytes:
    """``signing_key`` from the columns alone (set-based reads load no endpoint objects)."""
    return box_of(session).decrypt(ciphertext, context=secret_context(endpoint_id))


# --- validation -------------------------------------------------------------------------------


def check_url(session: Session, url: Any) -> str | None:
    if not isinstance(url, str) or not url.strip():
        return "is required"
    if len(url) > MAX_URL:
        return f"must be at most {MAX_URL} characters"
    if any(char.isspace() or ord(char) < 32 or 0x7F <= ord(char) < 0xA0 for char in url):
        return "must not contain whitespace or control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        return "is not a valid URL"
    insecure = settings_of(session).allow_insecure_urls
    allowed = ("https", "http") if insecure else ("https",)
    if parts.scheme not in allowed:
        return "must be an https:// URL"
    if not parts.hostname:
        return "must include a host"
    if not _URL[insecure].fullmatch(url):
        return "must be printable ASCII: https://host[:port][/path], no credentials"
    return None


def check_events(events: Any) -> str | None:
    if not isinstance(events, list) or not events:
        return "must list at least one event type"
    if len(events) > MAX_EVENTS:
        return f"must list at most {MAX_EVENTS} event types"
    if len(set(events)) != len(events):
        return "must not contain duplicates"
    for event in events:
        if event in SYSTEM_EVENT_TYPES:
            return f"{event} is not subscribable"
        if event not in SUBSCRIBABLE_EVENT_TYPES:
            return f"unknown event type: {event}"
    return None


def check_description(description: Any) -> str | None:
    if not isinstance(description, str):
        return "must be a string"
    if len(description) > MAX_DESCRIPTION:
        return f"must be at most {MAX_DESCRIPTION} characters"
    if "\x00" in description:
        return "must not contain NUL characters"
    return None


# --- rules ------------------------------------------------------------------------------------


def create_endpoint(
    session: Session,
    org_id: uuid.UUID,
    *,
    url: str,
    events: Sequence[str],
    description: str = "",
    api_version: str | None = None,
    secret: str | None = None,
    over_limit_by: Callable[[], int] | None = None,
) -> WithSecret:
    """Create an endpoint with a fresh secret (or the given one, minted earlier).

    ``over_limit_by`` lets a safe migrate exceed the cap (by its one new endpoint and the
    other unfinished pairs); asked only when the organization is at the cap.
    """
    version = SUPPORTED_API_VERSIONS[0] if api_version is None else api_version
    raise_if_any(
        {
            "url": check_url(session, url),
            "events": check_events(list(events)),
            "description": check_description(description),
            "api_version": None
            if version in SUPPORTED_API_VERSIONS
            else f"unsupported; supported: {', '.join(SUPPORTED_API_VERSIONS)}",
        }
    )
    lock_org(session, org_id)  # two concurrent creates cannot both take the last slot
    limit = settings_of(session).endpoint_limit
    if count_live(session, org_id, up_to=limit) >= limit:
        limit += over_limit_by() if over_limit_by is not None else 0
        if count_live(session, org_id, up_to=limit) >= limit:
            raise LimitExceeded(f"an organization may have at most {limit} active endpoints")
    now = clock.now()
    endpoint = WebhookEndpoint(
        id=new_id(),
        org_id=org_id,
        url=url,
        description=description.strip(),
        events=list(events),
        active=True,
        api_version=version,
        created_at=now,
        updated_at=now,
    )
    secret = secret or new_secret()
    seal_secret(session, endpoint, secret)
    session.add(endpoint)
    session.flush()
    return WithSecret(endpoint=endpoint, secret=secret)


def count_live(session: Session, org_id: uuid.UUID, *, up_to: int) -> int:
    """The organization's live endpoints, counted up to ``up_to`` (the cap being checked): a
    check reads no more rows than the cap, however many endpoints there are."""
    return session.scalar(_count_live(), {"org_id": org_id, "up_to": up_to}) or 0


# Statements a unit of work runs on every create or lock are built once: building one costs
# more CPU than running it (docs/performance.md, "Safe-migrate benchmark").
@cache
def _count_live() -> Select[int]:
    live = (
        select(WebhookEndpoint.id)
        .where(WebhookEndpoint.org_id == bindparam("org_id"), WebhookEndpoint.deleted_at.is_(None))
        .limit(bindparam("up_to"))
        .subquery()
    )
    return select(func.count()).select_from(live)


# A live endpoint of this organization; anything else is 404 (never 403).
_LIVE = (
    WebhookEndpoint.id == bindparam("endpoint_id"),
    WebhookEndpoint.org_id == bindparam("org_id"),
    WebhookEndpoint.deleted_at.is_(None),
)


@dataclass(frozen=True, slots=True)
class EndpointView:
    """An endpoint as a read shows it: every column but the secret."""

    id: uuid.UUID
    org_id: uuid.UUID
    url: str
    description: str
    events: list[str]
    active: bool
    api_version: str
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


_READ = Query(
    select(*(WebhookEndpoint.__table__.c[field.name] for field in fields(EndpointView))).where(
        *_LIVE
    )
)


def get_endpoint(
    session: Session, org_id: uuid.UUID, endpoint_id: uuid.UUID, *, for_update: bool = False
) -> WebhookEndpoint:
    """A live endpoint of this organization, in a unit of work (locked with ``for_update``)."""
    params = {"org_id": org_id, "endpoint_id": endpoint_id}
    endpoint = session.scalars(_live_endpoint(for_update), params).one_or_none()
    if endpoint is None:
        raise NotFound()
    return endpoint


@cache
def _live_endpoint(for_update: bool) -> Select[WebhookEndpoint]:
    query = select(WebhookEndpoint).where(*_LIVE)
    return query.with_for_update(key_share=True) if for_update else query


async def read_endpoint(reads: Reads, org_id: uuid.UUID, endpoint_id: uuid.UUID) -> EndpointView:
    """The same endpoint for showing it: read on the event loop, its secret never loaded."""
    row = await reads.one(_READ, org_id=org_id, endpoint_id=endpoint_id)
    if row is None:
        raise NotFound()
    return EndpointView(**row)


def list_endpoints(
    session: Session, org_id: uuid.UUID, *, limit: int, cursor: str | None
) -> Page[WebhookEndpoint]:
    query = select(WebhookEndpoint).where(
        WebhookEndpoint.org_id == org_id, WebhookEndpoint.deleted_at.is_(None)
    )
    return paginate(
        session,
        query,
        created_at=WebhookEndpoint.created_at,
        id_column=WebhookEndpoint.id,
        limit=limit,
        cursor=cursor,
    )


UPDATABLE = frozenset({"url", "description", "events", "active"})
# What a running migration copied or tests with: unchangeable while one uses the endpoint.
PINNED = ("url", "events")


def update_endpoint(
    session: Session, org_id: uuid.UUID, endpoint_id: uuid.UUID, changes: Mapping[str, Any]
) -> WebhookEndpoint:
    """Apply a partial update; ``api_version`` is immutable and unknown fields are refused."""
    problems: dict[str, str | None] = {}
    for field in changes:
        if field == "api_version":
            problems[field] = "is immutable"
        elif field not in UPDATABLE:
            problems[field] = "unknown field"
    if "url" in changes:
        problems["url"] = check_url(session, changes["url"])
    if "events" in changes:
        problems["events"] = check_events(changes["events"])
    if "description" in changes:
        problems["description"] = check_description(changes["description"])
    if "active" in changes and not isinstance(changes["active"], bool):
        problems["active"] = "must be a boolean"
    raise_if_any(problems)
    endpoint = get_endpoint(session, org_id, endpoint_id, for_update=True)
    if any(field in changes and getattr(endpoint, field) != changes[field] for field in PINNED):
        ensure_idle(session, endpoint.id)
    changed = False
    for field in ("url", "events", "active"):
        if field in changes and getattr(endpoint, field) != changes[field]:
            setattr(endpoint, field, changes[field])
            changed = True
    if "description" in changes and endpoint.description != changes["description"].strip():
        endpoint.description = changes["description"].strip()
        changed = True
    if changed:
        endpoint.updated_at = clock.now()
    return endpoint


def rotate_secret(
    session: Session, org_id: uuid.UUID, endpoint_id: uuid.UUID, *, by: uuid.UUID | None = None
) -> WithSecret:
    """Replace the secret at once; no grace window (that is what safe migrate is for).

    Refused (409) while a migration uses the endpoint: its in-band handoff is sealed under the
    old secret, and the new endpoint's secret is the one the operation holds. ``by``: the
    scheduled rotation doing this, which does not count as busy.
    """
    endpoint = get_endpoint(session, org_id, endpoint_id, for_update=True)
    ensure_idle(session, endpoint.id, besides=by)
    forget_endpoint_secret(session, endpoint)
    secret = new_secret()
    seal_secret(session, endpoint, secret)
    endpoint.updated_at = clock.now()
    return WithSecret(endpoint=endpoint, secret=secret)
