"""Organizations and their API keys: the only way in, and the tenancy boundary."""

from __future__ import annotations

import secrets
import string
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import JSON, ForeignKey, String, bindparam, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from models import clock
from models.base import Base, IdMixin, UTCDateTime
from models.crypto import hash_api_key
from models.errors import NotFound, Unauthorized, ValidationFailed
from models.reads import Query, Reads

API_KEY_PREFIX = "am_live_"
API_KEY_RANDOM_LEN = 34
API_KEY_LEN = len(API_KEY_PREFIX) + API_KEY_RANDOM_LEN
API_KEY_DISPLAY_PREFIX_LEN = 12
_ALPHABET = string.ascii_lowercase + string.digits


class Scope(StrEnum):
    WEBHOOKS_READ = "webhooks:read"
    WEBHOOKS_WRITE = "webhooks:write"
    ORG_ADMIN_WRITE = "org:admin:write"
    EVENTS_WRITE = "events:write"


ALL_SCOPES: tuple[Scope, ...] = tuple(Scope)


class Organization(IdMixin, Base):
    __tablename__ = "organizations"

    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=clock.now)


class ApiKey(IdMixin, Base):
    __tablename__ = "api_keys"

    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id"), index=True)
    prefix: Mapped[str] = mapped_column(String(API_KEY_DISPLAY_PREFIX_LEN))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=clock.now)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's organization and what it may do."""

    org_id: uuid.UUID
    key_id: uuid.UUID
    scopes: frozenset[str]


@dataclass(frozen=True)
class IssuedKey:
    org_id: uuid.UUID
    key_id: uuid.UUID
    api_key: str = field(repr=False)  # printed once by the command line; never in a repr
    scopes: list[str]


def parse_scopes(raw: Iterable[str]) -> list[str]:
    scopes = [scope.strip() for scope in raw if scope.strip()]
    unknown = sorted(set(scopes) - {scope.value for scope in Scope})
    if unknown:
        raise ValidationFailed({"scopes": f"unknown scope(s): {', '.join(unknown)}"})
    return sorted(set(scopes)) or [scope.value for scope in ALL_SCOPES]


def create_org(session: Session, name: str) -> Organization:
    name = name.strip()
    if not name or len(name) > 200:
        raise ValidationFailed({"name": "must be 1-200 characters"})
    org = Organization(name=name)
    session.add(org)
    session.flush()
    return org


def issue_key(session: Session, org_id: uuid.UUID, scopes: Iterable[str]) -> IssuedKey:
    if session.get(Organization, org_id) is None:
        raise NotFound()
    granted = parse_scopes(scopes)
    api_key = API_KEY_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(API_KEY_RANDOM_LEN))
    key = ApiKey(
        org_id=org_id,
        prefix=api_key[:API_KEY_DISPLAY_PREFIX_LEN],
        key_hash=hash_api_key(api_key),
        scopes=granted,
    )
    session.add(key)
    session.flush()
    return IssuedKey(org_id=org_id, key_id=key.id, api_key=api_key, scopes=granted)


def revoke_key(session: Session, key_id: uuid.UUID) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound()
    if key.revoked_at is None:
        key.revoked_at = clock.now()
    return key


def lock_org(session: Session, org_id: uuid.UUID) -> None:
    """Serialise per-organization rules (the endpoint cap, org secret rotation, the replay
    limit) on the organization row; a no-op on SQLite, whose writers are serialised anyway."""
    session.execute(_LOCK_ORG, {"org_id": org_id})


# Built once: every write runs these, and building one costs more CPU than running it
# (docs/performance.md, "Safe-migrate benchmark").
_KEY_REVOKED_AT = select(ApiKey.revoked_at).where(ApiKey.id == bindparam("key_id"))
_LOCK_ORG = (
    select(Organization.id)
    .where(Organization.id == bindparam("org_id"))
    .with_for_update(key_share=True)
)


def well_formed_key(api_key: str) -> bool:
    return (
        len(api_key) == API_KEY_LEN
        and api_key.startswith(API_KEY_PREFIX)
        and all(char in _ALPHABET for char in api_key[len(API_KEY_PREFIX) :])
    )


_LIVE_KEY = Query(
    select(ApiKey.id, ApiKey.org_id, ApiKey.scopes).where(
        ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None)
    )
)


class PrincipalCache:
    """Principals recently authenticated, by key hash, for ``ttl_seconds`` (0: no caching).

    What it costs: a revoked key keeps reading for up to ``ttl_seconds`` in a process that had
    just seen it. Writes never rely on it (``ensure_live`` in their unit of work). Bounded:
    when full, the oldest entries go first.
    """

    def __init__(self, ttl_seconds: float, max_entries: int = 10_000):
        self.ttl = timedelta(seconds=ttl_seconds)
        self.max_entries = max_entries
        self._entries: dict[str, tuple[datetime, Principal]] = {}

    def get(self, key_hash: str) -> Principal | None:
        entry = self._entries.get(key_hash)
        if entry is None:
            return None
        if entry[0] <= clock.now():
            self._entries.pop(key_hash, None)
            return None
        return entry[1]

    def put(self, key_hash: str, principal: Principal) -> None:
        if not self.ttl:
            return
        if len(self._entries) >= self.max_entries:
            for stale in list(self._entries)[: max(1, self.max_entries // 10)]:
                del self._entries[stale]
        self._entries[key_hash] = (clock.now() + self.ttl, principal)


async def authenticate(reads: Reads, api_key: str, cache: PrincipalCache) -> Principal:
    """The principal for a bearer key; one indexed lookup on the key's hash when not cached."""
    if not well_formed_key(api_key):
        raise Unauthorized()
    key_hash = hash_api_key(api_key)
    principal = cache.get(key_hash)
    if principal is not None:
        return principal
    row = await reads.one(_LIVE_KEY, key_hash=key_hash)
    if row is None:
        raise Unauthorized()
    principal = Principal(org_id=row["org_id"], key_id=row["id"], scopes=frozenset(row["scopes"]))
    cache.put(key_hash, principal)
    return principal


def ensure_live(session: Session, principal: Principal) -> None:
    """Inside a unit of work that writes: the key is not revoked, whatever a cache says."""
    revoked = session.execute(_KEY_REVOKED_AT, {"key_id": principal.key_id}).one_or_none()
    if revoked is None or revoked.revoked_at is not None:
        raise Unauthorized()
