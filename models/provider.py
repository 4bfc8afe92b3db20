"""Remote providers: an organization's account at another AgentMessage-compatible service, whose
endpoints Rotator migrates with the account's own API key (docs/api.md, "Remote providers").

This module holds the table and its rules. It makes no HTTP call: what the remote answered is
handed in by the caller (``workers.remote`` talks to the remote).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import ForeignKey, Index, LargeBinary, String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from models import clock
from models.base import Base, IdMixin, UTCDateTime
from models.db import box_of, settings_of
from models.errors import Conflict, NotFound, raise_if_any
from models.ids import new_id
from models.org import API_KEY_DISPLAY_PREFIX_LEN, API_KEY_PREFIX
from models.pagination import Page, paginate
from rotator.settings import Settings

MAX_NAME = 100
MAX_BASE_URL = 2048
MAX_API_KEY = 200
# A remote endpoint's id as the remote names it: opaque, but printable and short.
REMOTE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
_REMOTE_ID = re.compile(REMOTE_ID_PATTERN)
_KEY = re.compile(rf"^{API_KEY_PREFIX}[\x21-\x7e]{{1,{MAX_API_KEY - len(API_KEY_PREFIX)}}}$")
_BASE_URL = re.compile(r"^https?://[\x21-\x7e]+$")


class Provider(IdMixin, Base):
    __tablename__ = "providers"
    __table_args__ = (Index("ix_providers_org_created", "org_id", "created_at", "id"),)

    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id"))
    name: Mapped[str] = mapped_column(String(MAX_NAME))
    base_url: Mapped[str] = mapped_column(String(MAX_BASE_URL))
    # The remote API key, sealed like every secret at rest; None once the provider is deleted.
    key_ciphertext: Mapped[bytes | None] = mapped_column(LargeBinary)
    key_prefix: Mapped[str] = mapped_column(String(API_KEY_DISPLAY_PREFIX_LEN))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    def __repr__(self) -> str:
        return f"<Provider {self.id} {self.name!r} {self.base_url}>"


@dataclass(frozen=True)
class Account:
    """What a call to the remote needs: where, and the key (never in a repr or a log)."""

    provider_id: uuid.UUID | None  # None: a key being tried before it is stored
    base_url: str
    api_key: str = field(repr=False)


def key_context(provider_id: uuid.UUID) -> str:
    return f"provider:{provider_id}:api_key"


# --- validation -------------------------------------------------------------------------------


def check_name(name: Any) -> str | None:
    if not isinstance(name, str) or not name.strip():
        return "is required"
    if len(name) > MAX_NAME:
        return f"must be at most {MAX_NAME} characters"
    if any(ord(char) < 32 or ord(char) == 0x7F for char in name):
        return "must not contain control characters"
    return None


def check_base_url(settings: Settings, base_url: Any) -> str | None:
    """The service root: https (http only where insecure URLs are allowed, as for
    deliveries), a host, no query, fragment or credentials. Where it connects is checked by
    the same destination rules as every delivery, at connect time."""
    if not isinstance(base_url, str) or not base_url.strip():
        return "is required"
    if len(base_url) > MAX_BASE_URL:
        return f"must be at most {MAX_BASE_URL} characters"
    if not _BASE_URL.fullmatch(base_url):
        return "must be printable ASCII: https://host[:port][/path]"
    try:
        parts = urlsplit(base_url)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        return "is not a valid URL"
    insecure = settings.allow_insecure_urls
    if parts.scheme != "https" and not (insecure and parts.scheme == "http"):
        return "must be an https:// URL"
    if not parts.hostname or "@" in parts.netloc:
        return "must include a host and no credentials"
    if parts.query or parts.fragment or "?" in base_url or "#" in base_url:
        return "must not have a query or fragment"
    return None


def check_api_key(api_key: Any) -> str | None:
    if not isinstance(api_key, str) or not _KEY.fullmatch(api_key):
        return f"must be an API key of that service ({API_KEY_PREFIX}…, printable, no spaces)"
    return None


def check_remote_id(remote_id: str) -> None:
    """404 for an id no AgentMessage-compatible service could have minted."""
    if not _REMOTE_ID.fullmatch(remote_id):
        raise NotFound()


def normalized(base_url: str) -> str:
    return base_url.rstrip("/")


def validate(settings: Settings, values: dict[str, Any]) -> None:
    """422 naming each field of ``values`` (name, base_url, api_key; those present) that fails."""
    problems = {
        "name": check_name(values["name"]) if "name" in values else None,
        "base_url": check_base_url(settings, values["base_url"]) if "base_url" in values else None,
        "api_key": check_api_key(values["api_key"]) if "api_key" in values else None,
    }
    raise_if_any(problems)


# --- rules ------------------------------------------------------------------------------------


def create(
    session: Session, org_id: uuid.UUID, *, name: str, base_url: str, api_key: str
) -> Provider:
    """Store an account the caller has already checked against the remote."""
    validate(settings_of(session), {"name": name, "base_url": base_url, "api_key": api_key})
    now = clock.now()
    provider = Provider(
        id=new_id(),
        org_id=org_id,
        name=name,
        base_url=normalized(base_url),
        key_prefix=api_key[:API_KEY_DISPLAY_PREFIX_LEN],
        created_at=now,
        updated_at=now,
    )
    _seal_key(session, provider, api_key)
    session.add(provider)
    return provider


def _seal_key(session: Session, provider: Provider, api_key: str) -> None:
    provider.key_ciphertext = box_of(session).encrypt(
        api_key.encode(), context=key_context(provider.id)
    )


def get(
    session: Session, org_id: uuid.UUID, provider_id: uuid.UUID, *, for_update: bool = False
) -> Provider:
    query = select(Provider).where(
        Provider.id == provider_id, Provider.org_id == org_id, Provider.deleted_at.is_(None)
    )
    if for_update:
        query = query.with_for_update(key_share=True)
    provider = session.scalars(query).one_or_none()
    if provider is None:
        raise NotFound()
    return provider


def account_of(session: Session, provider: Provider) -> Account:
    if provider.key_ciphertext is None:
        raise NotFound()  # deleted
    key = box_of(session).decrypt(provider.key_ciphertext, context=key_context(provider.id))
    return Account(provider_id=provider.id, base_url=provider.base_url, api_key=key.decode())


def account(session: Session, org_id: uuid.UUID, provider_id: uuid.UUID) -> Account:
    return account_of(session, get(session, org_id, provider_id))


def list_providers(
    session: Session, org_id: uuid.UUID, *, limit: int, cursor: str | None
) -> Page[Provider]:
    query = select(Provider).where(Provider.org_id == org_id, Provider.deleted_at.is_(None))
    return paginate(
        session,
        query,
        created_at=Provider.created_at,
        id_column=Provider.id,
        limit=limit,
        cursor=cursor,
    )


def update(
    session: Session,
    org_id: uuid.UUID,
    provider_id: uuid.UUID,
    *,
    name: str | None = None,
    api_key: str | None = None,
) -> Provider:
    """Rename, or replace the key (already checked against the remote by the caller)."""
    provider = get(session, org_id, provider_id, for_update=True)
    values: dict[str, Any] = {}
    if name is not None:
        values["name"] = name
    if api_key is not None:
        values["api_key"] = api_key
    validate(settings_of(session), values)
    if name is not None:
        provider.name = name
    if api_key is not None:
        _seal_key(session, provider, api_key)
        provider.key_prefix = api_key[:API_KEY_DISPLAY_PREFIX_LEN]
    provider.updated_at = clock.now()
    return provider


def delete(
    session: Session, org_id: uuid.UUID, provider_id: uuid.UUID, *, busy: uuid.UUID | None
) -> Provider:
    """Forget the account and its key. ``busy``: an unfinished operation that uses it (409)."""
    provider = get(session, org_id, provider_id, for_update=True)
    if busy is not None:
        raise Conflict(
            "a remote migration uses this provider",
            details={"provider_id": f"used by unfinished operation {busy}"},
        )
    now = clock.now()
    provider.deleted_at = now
    provider.updated_at = now
    provider.key_ciphertext = None  # deleted providers keep no key
    return provider
