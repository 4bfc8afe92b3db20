"""The organization's signing secret, and its grace window (docs/architecture.md).

Rows per organization: at most one ``current`` and one ``previous``, enforced by partial unique
indexes. Whether the previous secret still signs is decided when read (``valid_until > now``),
never by whether the expiry task or the sweeper has run yet (invariant 5): they only tidy up.
"""

from __future__ import annotations

import base64
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from functools import cache
from typing import Any

from sqlalchemy import ForeignKey, Index, LargeBinary, bindparam, select, text
from sqlalchemy.orm import Mapped, Session, mapped_column

from models import clock
from models.base import Base, IdMixin, UTCDateTime, enum_column
from models.db import box_of, settings_of
from models.ids import new_id
from models.org import lock_org


class SecretState(StrEnum):
    CURRENT = "current"
    PREVIOUS = "previous"
    EXPIRED = "expired"


class ExpiredBy(StrEnum):
    ROTATION = "rotation"  # rotated again inside the window
    TASK = "task"  # the ETA task enqueued at rotation
    SWEEPER = "sweeper"  # the beat sweeper


class OrgSecret(IdMixin, Base):
    __tablename__ = "org_secrets"
    __table_args__ = (
        Index(
            "uq_org_secrets_one_current",
            "org_id",
            unique=True,
            postgresql_where=text("state = 'current'"),
            sqlite_where=text("state = 'current'"),
        ),
        Index(
            "uq_org_secrets_one_previous",
            "org_id",
            unique=True,
            postgresql_where=text("state = 'previous'"),
            sqlite_where=text("state = 'previous'"),
        ),
        Index("ix_org_secrets_state_valid_until", "state", "valid_until"),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id"))
    state: Mapped[SecretState] = mapped_column(enum_column(SecretState, 16))
    # None once expired: a secret that no longer signs is not kept.
    secret_ciphertext: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Set when the secret becomes previous: it signs while valid_until > now.
    valid_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expired_by: Mapped[ExpiredBy | None] = mapped_column(enum_column(ExpiredBy, 16))

    @property
    def expiry_lag_seconds(self) -> float | None:
        """How long after ``valid_until`` the row was marked expired (the sweeper's lag)."""
        if self.expired_at is None or self.valid_until is None:
            return None
        return (self.expired_at - self.valid_until).total_seconds()


@dataclass(frozen=True)
class Rotation:
    secret: str = field(repr=False)  # shown once, in the response; never in a repr
    rotated_at: datetime
    previous_valid_until: datetime | None
    previous_id: uuid.UUID | None


def secret_context(secret_id: uuid.UUID) -> str:
    return f"org_secret:{secret_id}"


def rotate(session: Session, org_id: uuid.UUID) -> Rotation:
    """Mint a new current secret in one transaction; the old current signs for the grace window.

    Rotating again inside the window expires the older previous at once. Concurrent rotations
    of one organization serialise on the organization row.
    """
    from models.operation import forget_org_secret  # operations build on org secrets

    lock_org(session, org_id)
    forget_org_secret(session, org_id)
    now = clock.now()
    grace = timedelta(seconds=settings_of(session).org_secret_grace_seconds)
    rows = session.scalars(
        select(OrgSecret).where(
            OrgSecret.org_id == org_id,
            OrgSecret.state.in_([SecretState.CURRENT, SecretState.PREVIOUS]),
        )
    ).all()
    # Free the unique slots in order: previous → expired, then current → previous.
    for row in rows:
        if row.state == SecretState.PREVIOUS:
            _expire(row, now, ExpiredBy.ROTATION)
    session.flush()
    previous: OrgSecret | None = None
    for row in rows:
        if row.state == SecretState.CURRENT:
            row.state = SecretState.PREVIOUS
            row.valid_until = now + grace
            previous = row
    session.flush()
    raw = secrets.token_bytes(32)
    current = OrgSecret(id=new_id(), org_id=org_id, state=SecretState.CURRENT, created_at=now)
    current.secret_ciphertext = box_of(session).encrypt(raw, context=secret_context(current.id))
    session.add(current)
    session.flush()
    return Rotation(
        secret=base64.b64encode(raw).decode(),
        rotated_at=now,
        previous_valid_until=previous.valid_until if previous else None,
        previous_id=previous.id if previous else None,
    )


def signing_keys(session: Session, org_id: uuid.UUID) -> list[bytes]:
    """The keys that sign now: current first, then previous only while ``valid_until > now``."""
    return signing_keys_of(session, [org_id]).get(org_id, [])


@cache
def _signing_rows() -> Any:
    """``signing_keys_of``'s query, built once (the data plane runs it for every claim)."""
    return select(
        OrgSecret.id,
        OrgSecret.org_id,
        OrgSecret.state,
        OrgSecret.secret_ciphertext,
        OrgSecret.valid_until,
    ).where(
        OrgSecret.org_id.in_(bindparam("orgs", expanding=True)),
        OrgSecret.state.in_([SecretState.CURRENT, SecretState.PREVIOUS]),
    )


def signing_keys_of(session: Session, org_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, list[bytes]]:
    """``signing_keys`` of several organizations in one query (columns, no ORM objects);
    an organization without a key that signs now is left out."""
    orgs = list(org_ids)
    if not orgs:
        return {}
    now = clock.now()
    rows = session.connection().execute(_signing_rows(), {"orgs": orgs}).all()
    box = box_of(session)
    keys: dict[uuid.UUID, list[bytes]] = {}
    for row in sorted(rows, key=lambda r: r.state != SecretState.CURRENT):
        if row.secret_ciphertext is None or (
            row.state == SecretState.PREVIOUS
            and (row.valid_until is None or row.valid_until <= now)
        ):
            continue
        keys.setdefault(row.org_id, []).append(
            box.decrypt(row.secret_ciphertext, context=secret_context(row.id))
        )
    return keys


def _expire(row: OrgSecret, now: datetime, by: ExpiredBy) -> None:
    """Past its grace (or cut short by the next rotation): it never signs again, so its
    ciphertext goes; the row stays as the record of when and by what it expired."""
    row.state = SecretState.EXPIRED
    row.secret_ciphertext = None
    row.expired_at = now
    row.expired_by = by


def expire_one(session: Session, secret_id: uuid.UUID) -> bool:
    """Mark one previous secret expired if its window has passed. Idempotent."""
    row = session.scalars(
        select(OrgSecret).where(OrgSecret.id == secret_id).with_for_update(key_share=True)
    ).one_or_none()
    now = clock.now()
    if row is None or row.state != SecretState.PREVIOUS:
        return False
    if row.valid_until is not None and row.valid_until > now:
        return False
    _expire(row, now, ExpiredBy.TASK)
    return True


def sweep(session: Session) -> list[float]:
    """Expire every overdue previous secret; return each one's lag in seconds. Idempotent."""
    now = clock.now()
    rows = session.scalars(
        select(OrgSecret)
        .where(OrgSecret.state == SecretState.PREVIOUS, OrgSecret.valid_until <= now)
        .with_for_update(key_share=True, skip_locked=True)
    ).all()
    lags = []
    for row in rows:
        _expire(row, now, ExpiredBy.SWEEPER)
        lags.append(row.expiry_lag_seconds or 0.0)
    return lags
